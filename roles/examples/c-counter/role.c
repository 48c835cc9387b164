// Counts the service events of each service, durably, and serves the counts.
//
// `hivemind role c-counter counts` (or GET /v1/roles/c-counter/counts)
// answers {"SERVICE": N, ...}; `counts SERVICE` answers one count. The counts
// live in the role's state, so they survive reloads, new versions and
// restarts. On a UDP listener, a datagram of a two-byte ID and `counts` is
// answered with the ID and the counts as JSON; the host keeps that reply and
// answers repeats itself until the next event (`hm_keep_reply`).

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hivemind_role.h"

#define COUNT_PREFIX "count/"

void exports_role_describe(role_description_t *ret) {
    ret->name = hm_string("c-counter");
    ret->version = hm_string("0.1.0");
    ret->subscribes.len = 1;
    ret->subscribes.ptr = malloc(sizeof(role_string_t));
    ret->subscribes.ptr[0] = hm_string("service.");
    ret->tick_interval_ms = 0;
}

bool exports_role_init(role_string_t *err) {
    (void)err;
    role_string_t prefix;
    role_string_set(&prefix, COUNT_PREFIX);
    role_list_string_t keys;
    hivemind_role_state_keys(&prefix, &keys);
    char message[64];
    snprintf(message, sizeof message, "counting %zu services so far", keys.len);
    role_list_string_free(&keys);
    hm_log(HIVEMIND_ROLE_HOST_LEVEL_INFO, message);
    return true;
}

bool exports_role_on_event(role_event_t *event, role_string_t *err) {
    bool ok = true;
    // The host redelivers after an error, so an event already counted (seq
    // at or below the last one) is skipped.
    if ((int64_t)event->seq > hm_state_get_int("last-seq", 0)) {
        // The key of a service event is SERVICE@NODE.
        size_t service_len = 0;
        while (service_len < event->key.len && event->key.ptr[service_len] != '@') {
            service_len++;
        }
        char *service = hm_cstring(event->key.ptr, service_len);
        char *key = malloc(strlen(COUNT_PREFIX) + service_len + 1);
        strcpy(key, COUNT_PREFIX);
        strcat(key, service);
        char *error = NULL;
        // Also a counter at the host's /metrics, labelled from a fixed set
        // (any role may emit any service.* kind); best effort, as metrics are.
        const char *change = hm_string_equals(&event->kind, "service.up")     ? "up"
                             : hm_string_equals(&event->kind, "service.down") ? "down"
                                                                              : "other";
        hm_count("service_events", "change", change, 1);
        if (!hm_state_set_int(key, hm_state_get_int(key, 0) + 1, &error) ||
            !hm_state_set_int("last-seq", (int64_t)event->seq, &error)) {
            *err = hm_string(error);
            free(error);
            ok = false;
        }
        free(key);
        free(service);
    }
    role_event_free(event);
    return ok;
}

// `{"SERVICE": N, ...}` for every counted service, or only `only`'s.
static bool counts_json(hm_buffer_t *body, const char *only) {
    role_string_t prefix;
    role_string_set(&prefix, COUNT_PREFIX);
    role_list_string_t keys;
    hivemind_role_state_keys(&prefix, &keys);
    bool found = false;
    hm_buffer_push(body, "{");
    for (size_t i = 0; i < keys.len; i++) {
        char *key = hm_cstring(keys.ptr[i].ptr, keys.ptr[i].len);
        const char *service = key + strlen(COUNT_PREFIX);
        if (only == NULL || strcmp(only, service) == 0) {
            if (found) {
                hm_buffer_push(body, ",");
            }
            hm_buffer_push_json_string(body, service);
            hm_buffer_push(body, ":");
            hm_buffer_push_int(body, hm_state_get_int(key, 0));
            found = true;
        }
        free(key);
    }
    hm_buffer_push(body, "}");
    role_list_string_free(&keys);
    return found;
}

void exports_role_on_request(role_request_t *request, role_response_t *ret) {
    char *command = hm_request_command(request);
    if (strcmp(command, "counts") != 0) {
        hm_buffer_t message = {0};
        hm_buffer_push(&message, "no such command or route: ");
        char *method = hm_cstring(request->method.ptr, request->method.len);
        char *path = hm_cstring(request->path.ptr, request->path.len);
        hm_buffer_push(&message, method);
        hm_buffer_push(&message, " ");
        hm_buffer_push(&message, path);
        hm_response_error(ret, 404, message.text);
        free(message.text);
        free(method);
        free(path);
    } else {
        char *service = hm_request_arg(request, 0);
        hm_buffer_t body = {0};
        if (counts_json(&body, service) || service == NULL) {
            hm_response_json(ret, 200, body.text);
        } else {
            hm_buffer_t message = {0};
            hm_buffer_push(&message, "no events counted for service ");
            hm_buffer_push_json_string(&message, service);
            hm_response_error(ret, 404, message.text);
            free(message.text);
        }
        free(body.text);
        free(service);
    }
    free(command);
    role_request_free(request);
}

bool exports_role_on_packet(role_string_t *listener, role_string_t *peer, role_list_u8_t *data,
                            role_list_u8_t *ret) {
    bool answered = false;
    if (data->len == 8 && memcmp(data->ptr + 2, "counts", 6) == 0) {
        hm_buffer_t body = {0};
        counts_json(&body, NULL);
        size_t length = strlen(body.text);
        ret->ptr = malloc(2 + length);
        ret->len = 2 + length;
        memcpy(ret->ptr, data->ptr, 2);
        memcpy(ret->ptr + 2, body.text, length);
        free(body.text);
        // Only events change the counts, and the host forgets kept replies
        // after each one.
        hm_keep_reply(2, "count_queries", "kind", "counts");
        answered = true;
    }
    role_string_free(listener);
    role_string_free(peer);
    role_list_u8_free(data);
    return answered;
}

void exports_role_on_tick(void) {}

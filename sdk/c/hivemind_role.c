// Helpers for Hivemind roles written in C: see hivemind_role.h.

#include "hivemind_role.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void hm_log(hivemind_role_host_level_t level, const char *message) {
    role_string_t text;
    role_string_set(&text, message);
    hivemind_role_host_log(level, &text);
}

role_string_t hm_string(const char *text) {
    role_string_t copy;
    role_string_dup(&copy, text);
    return copy;
}

bool hm_string_equals(const role_string_t *text, const char *expected) {
    size_t len = strlen(expected);
    return text->len == len && memcmp(text->ptr, expected, len) == 0;
}

char *hm_cstring(const uint8_t *ptr, size_t len) {
    char *copy = malloc(len + 1);
    if (len > 0) {
        memcpy(copy, ptr, len);
    }
    copy[len] = '\0';
    return copy;
}

char *hm_state_get_text(const char *key) {
    role_string_t name;
    role_string_set(&name, key);
    role_list_u8_t value;
    if (!hivemind_role_state_get(&name, &value)) {
        return NULL;
    }
    char *text = hm_cstring(value.ptr, value.len);
    role_list_u8_free(&value);
    return text;
}

bool hm_state_set_text(const char *key, const char *value, char **error) {
    role_string_t name;
    role_string_set(&name, key);
    role_list_u8_t bytes = {(uint8_t *)value, strlen(value)};
    hivemind_role_state_host_error_t failure;
    if (hivemind_role_state_set(&name, &bytes, &failure)) {
        return true;
    }
    if (error != NULL) {
        // Every variant carries its text at the same place.
        *error = hm_cstring(failure.val.failed.ptr, failure.val.failed.len);
    }
    hivemind_role_state_host_error_free(&failure);
    return false;
}

bool hm_count(const char *name, const char *label, const char *value, uint64_t delta) {
    role_string_t counter;
    role_string_set(&counter, name);
    role_tuple2_string_string_t pair;
    role_list_tuple2_string_string_t labels = {&pair, 0};
    if (label != NULL) {
        role_string_set(&pair.f0, label);
        role_string_set(&pair.f1, value != NULL ? value : "");
        labels.len = 1;
    }
    hivemind_role_host_host_error_t failure;
    if (hivemind_role_host_count(&counter, &labels, delta, &failure)) {
        return true;
    }
    hivemind_role_host_host_error_free(&failure);
    return false;
}

bool hm_keep_reply(uint32_t skip, const char *tally, const char *label, const char *value) {
    role_tuple2_string_list_tuple2_string_string_t kept;
    role_tuple2_string_string_t pair;
    kept.f1.ptr = &pair;
    kept.f1.len = 0;
    if (tally != NULL) {
        role_string_set(&kept.f0, tally);
        if (label != NULL) {
            role_string_set(&pair.f0, label);
            role_string_set(&pair.f1, value != NULL ? value : "");
            kept.f1.len = 1;
        }
    }
    hivemind_role_host_host_error_t failure;
    if (hivemind_role_host_keep_reply(skip, tally != NULL ? &kept : NULL, &failure)) {
        return true;
    }
    hivemind_role_host_host_error_free(&failure);
    return false;
}

void hm_forget_replies(void) {
    hivemind_role_host_forget_replies();
}

int64_t hm_state_get_int(const char *key, int64_t fallback) {
    char *text = hm_state_get_text(key);
    if (text == NULL) {
        return fallback;
    }
    char *end;
    long long value = strtoll(text, &end, 10);
    bool valid = end != text && *end == '\0';
    free(text);
    return valid ? (int64_t)value : fallback;
}

bool hm_state_set_int(const char *key, int64_t value, char **error) {
    char text[24];
    snprintf(text, sizeof text, "%lld", (long long)value);
    return hm_state_set_text(key, text, error);
}

char *hm_request_command(const role_request_t *request) {
    const uint8_t *path = request->path.ptr;
    size_t len = request->path.len;
    size_t start = 0;
    while (start < len && path[start] == '/') {
        start++;
    }
    size_t end = start;
    while (end < len && path[end] != '/') {
        end++;
    }
    return hm_cstring(path + start, end - start);
}

// The `index`-th string of the `"args"` array in a CLI body, or NULL. Reads
// only that shape: `{"args": ["a", "b"]}` with JSON string escapes.
static char *cli_arg(const role_list_u8_t *body, size_t index) {
    const char *text = (const char *)body->ptr;
    const char *end = text + body->len;
    const char *key = "\"args\"";
    size_t key_len = strlen(key);
    const char *at = text;
    while (at + key_len <= end && memcmp(at, key, key_len) != 0) {
        at++;
    }
    if (at + key_len > end) {
        return NULL;
    }
    at += key_len;
    while (at < end && (*at == ' ' || *at == ':' || *at == '\n' || *at == '\t' || *at == '\r')) {
        at++;
    }
    if (at >= end || *at != '[') {
        return NULL;
    }
    at++;
    for (size_t current = 0;; current++) {
        while (at < end && (*at == ' ' || *at == ',' || *at == '\n' || *at == '\t' || *at == '\r')) {
            at++;
        }
        if (at >= end || *at != '"') {
            return NULL;
        }
        at++;
        char *value = malloc((size_t)(end - at) + 1);
        size_t len = 0;
        while (at < end && *at != '"') {
            char c = *at++;
            if (c == '\\' && at < end) {
                char escaped = *at++;
                switch (escaped) {
                    case 'n': c = '\n'; break;
                    case 't': c = '\t'; break;
                    case 'r': c = '\r'; break;
                    case 'b': c = '\b'; break;
                    case 'f': c = '\f'; break;
                    // \uXXXX is kept as written; other escapes are the
                    // character itself (\" \\ \/).
                    case 'u': value[len++] = '\\'; c = 'u'; break;
                    default: c = escaped; break;
                }
            }
            value[len++] = c;
        }
        if (at >= end) {
            free(value);
            return NULL;
        }
        at++;
        value[len] = '\0';
        if (current == index) {
            return value;
        }
        free(value);
    }
}

char *hm_request_arg(const role_request_t *request, size_t index) {
    char *from_body = cli_arg(&request->body, index);
    if (from_body != NULL || request->body.len > 0) {
        return from_body;
    }
    // Path segments after the command.
    const uint8_t *path = request->path.ptr;
    size_t len = request->path.len;
    size_t at = 0;
    size_t segment = 0;
    while (at < len) {
        while (at < len && path[at] == '/') {
            at++;
        }
        size_t start = at;
        while (at < len && path[at] != '/') {
            at++;
        }
        if (at == start) {
            break;
        }
        if (segment == index + 1) {
            return hm_cstring(path + start, at - start);
        }
        segment++;
    }
    return NULL;
}

static role_list_tuple2_string_string_t json_headers(void) {
    role_list_tuple2_string_string_t headers;
    headers.len = 1;
    headers.ptr = malloc(sizeof(role_tuple2_string_string_t));
    headers.ptr[0].f0 = hm_string("content-type");
    headers.ptr[0].f1 = hm_string("application/json");
    return headers;
}

void hm_response_json(role_response_t *response, uint16_t status, const char *json) {
    size_t len = strlen(json);
    response->status = status;
    response->headers = json_headers();
    response->body.len = len;
    response->body.ptr = malloc(len > 0 ? len : 1);
    memcpy(response->body.ptr, json, len);
}

void hm_response_error(role_response_t *response, uint16_t status, const char *message) {
    hm_buffer_t body = {0};
    hm_buffer_push(&body, "{\"error\":");
    hm_buffer_push_json_string(&body, message);
    hm_buffer_push(&body, "}");
    hm_response_json(response, status, body.text);
    free(body.text);
}

static void reserve(hm_buffer_t *buffer, size_t more) {
    if (buffer->len + more + 1 <= buffer->cap) {
        return;
    }
    size_t cap = buffer->cap == 0 ? 64 : buffer->cap;
    while (cap < buffer->len + more + 1) {
        cap *= 2;
    }
    buffer->text = realloc(buffer->text, cap);
    buffer->cap = cap;
}

void hm_buffer_push(hm_buffer_t *buffer, const char *text) {
    size_t len = strlen(text);
    reserve(buffer, len);
    memcpy(buffer->text + buffer->len, text, len + 1);
    buffer->len += len;
}

void hm_buffer_push_json_string(hm_buffer_t *buffer, const char *text) {
    hm_buffer_push(buffer, "\"");
    for (const char *at = text; *at != '\0'; at++) {
        char escaped[8];
        unsigned char c = (unsigned char)*at;
        if (c == '"' || c == '\\') {
            snprintf(escaped, sizeof escaped, "\\%c", c);
        } else if (c < 0x20) {
            snprintf(escaped, sizeof escaped, "\\u%04x", c);
        } else {
            escaped[0] = (char)c;
            escaped[1] = '\0';
        }
        hm_buffer_push(buffer, escaped);
    }
    hm_buffer_push(buffer, "\"");
}

void hm_buffer_push_int(hm_buffer_t *buffer, int64_t value) {
    char text[24];
    snprintf(text, sizeof text, "%lld", (long long)value);
    hm_buffer_push(buffer, text);
}

// Helpers for Hivemind roles written in C, on top of the bindings that
// `wit-bindgen c wit/ --world role` generates (role.h, role.c,
// role_component_type.o).
//
// Ownership follows wit-bindgen's C conventions: an export's arguments belong
// to the export (free them, e.g. `role_request_free`), and what it returns
// must be allocated with malloc, because the generated post-return functions
// free it. The helpers below allocate accordingly.
//
// The host may run several instances of a role and replace any of them at
// any time: keep what matters in state (`hm_state_*`), not in globals.

#ifndef HIVEMIND_ROLE_H
#define HIVEMIND_ROLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "role.h"

// Logs `message` (a C string) at `level`, e.g. HIVEMIND_ROLE_HOST_LEVEL_INFO.
void hm_log(hivemind_role_host_level_t level, const char *message);

// A malloc'd copy of `text` as a component string, for returned values.
role_string_t hm_string(const char *text);

// Whether the component string `text` equals the C string `expected`.
bool hm_string_equals(const role_string_t *text, const char *expected);

// A malloc'd, NUL-terminated copy of a component string or byte list.
char *hm_cstring(const uint8_t *ptr, size_t len);

// The state value of `key` as a NUL-terminated, malloc'd string, or NULL
// when the key is absent.
char *hm_state_get_text(const char *key);

// Stores `value` (a C string) under `key`; false when the host refused,
// with the reason in `error` (malloc'd; may be NULL when not wanted).
bool hm_state_set_text(const char *key, const char *value, char **error);

// The state value of `key` as a decimal number, or `fallback` when absent
// or not a number.
int64_t hm_state_get_int(const char *key, int64_t fallback);

// Stores `value` as decimal text (which is also JSON).
bool hm_state_set_int(const char *key, int64_t value, char **error);

// Adds `delta` to the counter `name`, with one label (`label` = `value`) or
// none (`label` NULL), served at the host's `/metrics` as
// `hivemind_counter_NAME_total`. False when the host refused (a bad name, too
// many series). Each call crosses into the host: on a hot path, sum and
// report in batches.
bool hm_count(const char *name, const char *label, const char *value, uint64_t delta);

// Inside `on-packet` for a UDP datagram: lets the host answer later
// datagrams on the same listener that match this one after its first `skip`
// bytes with the reply being returned (its first `skip` bytes taken from
// each datagram), without calling the role. Only for a reply that depends
// on nothing but the datagram and what the role holds; the host forgets
// kept replies after an event or a request and on `hm_forget_replies`. With
// `tally` set, each reuse adds one to that counter (with one label, or none
// when `label` is NULL), as `hm_count` would. False when the host refused.
bool hm_keep_reply(uint32_t skip, const char *tally, const char *label, const char *value);

// Forgets every reply kept with `hm_keep_reply` once this call ends.
void hm_forget_replies(void);

// The request's command: its first path segment (`counts` for `/counts/x`),
// malloc'd.
char *hm_request_command(const role_request_t *request);

// The request's `index`-th argument, malloc'd, or NULL when there is none:
// the CLI sends `{"args": [...]}` as the body; other requests give the path
// segments after the command.
char *hm_request_arg(const role_request_t *request, size_t index);

// Fills `response` with status and a JSON body (a C string, copied).
void hm_response_json(role_response_t *response, uint16_t status, const char *json);

// Fills `response` with `{"error": message}`, the host's own error shape.
void hm_response_error(role_response_t *response, uint16_t status, const char *message);

// A growable, NUL-terminated text buffer for building replies.
typedef struct {
    char *text;
    size_t len;
    size_t cap;
} hm_buffer_t;

// Appends `text` to `buffer`.
void hm_buffer_push(hm_buffer_t *buffer, const char *text);

// Appends `text` as a JSON string literal, quoted and escaped.
void hm_buffer_push_json_string(hm_buffer_t *buffer, const char *text);

// Appends a decimal number.
void hm_buffer_push_int(hm_buffer_t *buffer, int64_t value);

#endif

// Counts the service events of each service, durably, and serves the counts.
//
// `hivemind role js-counter counts` (or GET /v1/roles/js-counter/counts)
// answers {"SERVICE": N, ...}; `counts SERVICE` answers one count. The counts
// live in the role's state, so they survive reloads, new versions and restarts.
// On a UDP listener, a datagram of a two-byte ID and `counts` is answered with
// the ID and the counts as JSON; the host keeps that reply and answers repeats
// itself until the next event (`keepReply`).

import { defineRole, host, Response, state } from "../../../sdk/js/hivemind-role.js";

export const { describe, init, onEvent, onRequest, onPacket, onTick } = defineRole({
  name: "js-counter",
  version: "0.1.0",
  subscribes: ["service."],

  init() {
    host.info(`counting ${state.keys("count/").length} services so far`);
  },

  onEvent(event) {
    // The host redelivers after an error, so an event already counted (seq
    // at or below the last one) is skipped.
    if (event.seq <= BigInt(state.getJson("last-seq", 0))) return;
    const service = event.key.split("@")[0];
    const key = `count/${service}`;
    // Also a counter at the host's /metrics, labelled from a fixed set (any
    // role may emit any service.* kind); best effort, as metrics are.
    const change = { "service.up": "up", "service.down": "down" }[event.kind] ?? "other";
    try {
      host.count("service_events", { change });
    } catch {}
    state.setJson(key, state.getJson(key, 0) + 1);
    state.setJson("last-seq", Number(event.seq));
  },

  onRequest(request) {
    if (request.command !== "counts") return Response.notFound(request);
    const counts = countsByService();
    const [service] = request.args;
    if (service === undefined) return Response.json(counts);
    if (!(service in counts)) return Response.error(404, `no events counted for service "${service}"`);
    return Response.json({ [service]: counts[service] });
  },

  onPacket(listener, peer, data) {
    if (data.length !== 8 || new TextDecoder().decode(data.subarray(2)) !== "counts") return undefined;
    // Only events change the counts, and the host forgets kept replies
    // after each one.
    try {
      host.keepReply(2, ["count_queries", { kind: "counts" }]);
    } catch (error) {
      // Best effort: the reply is right either way.
    }
    const json = new TextEncoder().encode(JSON.stringify(countsByService()));
    const reply = new Uint8Array(2 + json.length);
    reply.set(data.subarray(0, 2));
    reply.set(json, 2);
    return reply;
  },
});

function countsByService() {
  const counts = {};
  for (const key of state.keys("count/")) counts[key.slice("count/".length)] = state.getJson(key);
  return counts;
}

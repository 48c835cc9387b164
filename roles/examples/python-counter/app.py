"""Counts the service events of each service, durably, and serves the counts.

`hivemind role python-counter counts` (or GET /v1/roles/python-counter/counts)
answers {"SERVICE": N, ...}; `counts SERVICE` answers one count. The counts
live in the role's state, so they survive reloads, new versions and restarts.
On a UDP listener, a datagram of a two-byte ID and `counts` is answered with
the ID and the counts as JSON; the host keeps that reply and answers repeats
itself until the next event (`keep_reply`).
"""

import json

import hivemind_role as hm


class ServiceCounter(hm.Role):
    name = "python-counter"
    version = "0.1.0"
    subscribes = ["service."]

    def init(self):
        hm.host.info(f"counting {len(hm.state.keys('count/'))} services so far")

    def on_event(self, event):
        # The host redelivers after an error, so an event already counted
        # (seq at or below the last one) is skipped.
        if event.seq <= hm.state.get_json("last-seq", 0):
            return
        service = event.key.split("@", 1)[0]
        key = f"count/{service}"
        # Also a counter at the host's /metrics, labelled from a fixed set
        # (any role may emit any service.* kind); best effort, as metrics are.
        change = {"service.up": "up", "service.down": "down"}.get(event.kind, "other")
        try:
            hm.host.count("service_events", {"change": change})
        except hm.HostError:
            pass
        hm.state.set_json(key, hm.state.get_json(key, 0) + 1)
        hm.state.set_json("last-seq", event.seq)

    def on_request(self, request):
        if request.command != "counts":
            return hm.Response.not_found(request)
        counts = _counts()
        if request.args:
            service = request.args[0]
            if service not in counts:
                return hm.Response.error(404, f"no events counted for service {json.dumps(service)}")
            return hm.Response.json({service: counts[service]})
        return hm.Response.json(counts)


    def on_packet(self, listener, peer, data):
        if data[2:] != b"counts":
            return None
        # Only events change the counts, and the host forgets kept replies
        # after each one.
        try:
            hm.host.keep_reply(2, ("count_queries", {"kind": "counts"}))
        except hm.HostError:
            pass
        return data[:2] + json.dumps(_counts(), separators=(",", ":")).encode()


def _counts():
    return {key[len("count/"):]: hm.state.get_json(key) for key in hm.state.keys("count/")}


WitWorld = hm.export(ServiceCounter)

// Write Hivemind roles in JavaScript, for componentize-js.
//
// A role is an object of plain functions; `defineRole` turns it into the
// exports of the `role` world:
//
//     import { defineRole, Response, state } from "./hivemind-role.js";
//
//     export const { describe, init, onEvent, onRequest, onPacket, onTick } = defineRole({
//       name: "hello",
//       version: "0.1.0",
//       subscribes: ["service."],
//       onEvent(event) { state.setJson("last", event.json()); },
//       onRequest(request) { return Response.json({ last: state.getJson("last") }); },
//     });
//
// Build with `componentize-js role.js --wit WIT -n role -d http fetch-event
// -o NAME.wasm` (`hivemind roles new NAME --lang js` writes a project that
// does this). componentize-js builds one file: the project's build bundles
// this module into it first.
//
// The host may run several instances of a role and replace any of them at
// any time: keep what matters in `state`, not in module variables.

import * as hostImports from "hivemind:role/host@0.1.3";
import * as stateImports from "hivemind:role/state@0.1.3";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A host call failed; `kind` is denied, invalid, unavailable, overloaded or failed. */
export class HostError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.name = "HostError";
    this.kind = kind;
    this.detail = message;
  }
}

/** Calls an import returning `result<T, host-error>`; the error becomes a HostError. */
function hostCall(fn, ...args) {
  try {
    return fn(...args);
  } catch (error) {
    const payload = error && error.payload;
    if (payload && typeof payload.tag === "string") {
      throw new HostError(payload.tag, String(payload.val));
    }
    throw error;
  }
}

/** Bytes as they are, a string as UTF-8, anything else as JSON. */
function toBytes(payload) {
  if (payload instanceof Uint8Array) return payload;
  if (typeof payload === "string") return encoder.encode(payload);
  return encoder.encode(JSON.stringify(payload));
}

/** One committed entry of the cluster's event log. */
export class Event {
  constructor(raw) {
    this.seq = raw.seq; // BigInt
    this.epoch = raw.epoch; // BigInt
    this.kind = raw.kind;
    this.key = raw.key;
    this.source = raw.source;
    this.timestampMs = raw.timestampMs; // BigInt
    this.payload = raw.payload; // Uint8Array
  }
  /** The payload as text. */
  text() {
    return decoder.decode(this.payload);
  }
  /** The payload parsed as JSON; throws naming the event when it is not. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (error) {
      throw new Error(`event ${this.seq} (${this.kind} ${this.key}): payload is not JSON: ${error.message}`);
    }
  }
}

/** A request for the role: the API's `/v1/roles/NAME/...` or the CLI's `hivemind role NAME CMD ARGS...`. */
export class Request {
  constructor(raw) {
    this.method = raw.method;
    this.path = raw.path;
    this.query = raw.query;
    this.headers = raw.headers; // [[name, value], ...]
    this.body = raw.body; // Uint8Array
  }
  /** The first path segment: `records` for `/records/web`. */
  get command() {
    return this.path.replace(/^\/+/, "").split("/")[0];
  }
  /** The CLI's arguments, or else the path segments after the command. */
  get args() {
    try {
      const body = JSON.parse(decoder.decode(this.body));
      if (body && Array.isArray(body.args)) return body.args.map(String);
    } catch {
      // Not a CLI body: fall back to the path.
    }
    return this.path.replace(/^\/+/, "").split("/").slice(1).filter((segment) => segment !== "");
  }
  /** The value of query parameter `name` (not percent-decoded), or undefined. */
  queryParam(name) {
    for (const pair of this.query.split("&")) {
      const at = pair.indexOf("=");
      const [key, value] = at < 0 ? [pair, ""] : [pair.slice(0, at), pair.slice(at + 1)];
      if (key === name) return value;
    }
    return undefined;
  }
  /** The first header called `name`, ignoring case. */
  header(name) {
    const wanted = name.toLowerCase();
    const found = this.headers.find(([key]) => key.toLowerCase() === wanted);
    return found && found[1];
  }
  text() {
    return decoder.decode(this.body);
  }
  /** The body parsed as JSON; throws when it is not. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (error) {
      throw new Error(`request body is not JSON: ${error.message}`);
    }
  }
}

export class Response {
  constructor(status = 200, headers = [], body = new Uint8Array()) {
    this.status = status;
    this.headers = headers;
    this.body = toBytes(body);
  }
  static json(value, status = 200) {
    return new Response(status, [["content-type", "application/json"]], JSON.stringify(value));
  }
  static text(text, status = 200) {
    return new Response(status, [["content-type", "text/plain; charset=utf-8"]], text);
  }
  /** `{"error": message}`, the shape the host's own errors have. */
  static error(status, message) {
    return Response.json({ error: message }, status);
  }
  static notFound(request) {
    return Response.error(404, `no such command or route: ${request.method} ${request.path}`);
  }
}

function toRequest(request) {
  return {
    method: request.method,
    path: request.path,
    query: request.query || "",
    headers: request.headers || [],
    body: toBytes(request.body || new Uint8Array()),
  };
}

/** Host functions. Those that can fail throw HostError. */
export const host = {
  /** `level`: trace, debug, info, warn or error. */
  log(level, message) {
    hostImports.log(level, String(message));
  },
  info(message) {
    hostImports.log("info", String(message));
  },
  warn(message) {
    hostImports.log("warn", String(message));
  },
  error(message) {
    hostImports.log("error", String(message));
  },
  /** Appends an event (payload as bytes, string or JSON); its seq (BigInt) once durable. Needs `grants.emit`. */
  emit(kind, key, payload) {
    return hostCall(hostImports.emit, kind, key, toBytes(payload));
  },
  eventsSince(after, kindPrefix = "", limit = 100) {
    return hostCall(hostImports.eventsSince, BigInt(after), kindPrefix, limit).map((event) => new Event(event));
  },
  nodes(role = undefined, healthyOnly = false) {
    return hostImports.nodes(role, healthyOnly);
  },
  selfNode() {
    return hostImports.selfNode();
  },
  /** The manifest's `[config]` table. */
  config() {
    return JSON.parse(hostImports.config());
  },
  /** Calls `role`'s onRequest on `node`. */
  call(node, role, request) {
    const reply = hostCall(hostImports.call, node, role, toRequest(request));
    return new Response(reply.status, reply.headers, reply.body);
  },
  /** Atomically writes below the granted `grants.write-dir`. */
  writeFile(path, contents) {
    hostCall(hostImports.writeFile, path, toBytes(contents));
  },
  /** Runs a program granted by `grants.exec`: {status, stdout, stderr}. */
  exec(program, args, timeoutMs = 5000) {
    return hostCall(hostImports.exec, program, args, timeoutMs);
  },
  /** Milliseconds a TCP connect to `HOST:PORT` took; HostError when it failed. Needs `grants.check`. */
  checkTcp(address, timeoutMs = 1000) {
    return hostCall(hostImports.check, { tag: "tcp", val: address }, timeoutMs);
  },
  /** Milliseconds a GET of `url` took to answer 2xx. */
  checkHttp(url, timeoutMs = 1000) {
    return hostCall(hostImports.check, { tag: "http", val: url }, timeoutMs);
  },
  /**
   * Adds `delta` to the counter `name` for `labels` ({label: value}), served at the host's
   * `/metrics` as `hivemind_counter_NAME_total`. Each call crosses into the host: on a hot path,
   * sum and report in batches.
   */
  count(name, labels = {}, delta = 1) {
    hostCall(hostImports.count, name, Object.entries(labels), BigInt(delta));
  },
  /**
   * Inside `onPacket` for a UDP datagram: lets the host answer later datagrams on the same
   * listener that match this one after its first `skip` bytes with the reply being returned (its
   * first `skip` bytes taken from each datagram), without calling the role. Only for a reply that
   * depends on nothing but the datagram and what the role holds; the host forgets kept replies
   * after an event or a request and on `forgetReplies`. With `tally` ([name, {label: value}]),
   * each reuse adds one to that counter as `count` would.
   */
  keepReply(skip, tally) {
    const kept = tally === undefined ? undefined : [tally[0], Object.entries(tally[1] ?? {})];
    hostCall(hostImports.keepReply, skip, kept);
  },
  /** Forgets every reply kept with `keepReply` once this call ends. */
  forgetReplies() {
    hostImports.forgetReplies();
  },
};

/** Durable key-value state private to the role: it survives reloads, new versions and restarts. */
export const state = {
  /** The value as bytes (Uint8Array), or undefined. */
  get(key) {
    return stateImports.get(key);
  },
  /** The value as text, or undefined. */
  getText(key) {
    const value = stateImports.get(key);
    return value === undefined ? undefined : decoder.decode(value);
  },
  /** Stores bytes, a string or JSON. */
  set(key, value) {
    hostCall(stateImports.set, key, toBytes(value));
  },
  delete(key) {
    hostCall(stateImports.delete, key);
  },
  keys(prefix = "") {
    return stateImports.keys(prefix);
  },
  getJson(key, fallback = undefined) {
    const value = stateImports.get(key);
    return value === undefined ? fallback : JSON.parse(decoder.decode(value));
  },
  setJson(key, value) {
    hostCall(stateImports.set, key, encoder.encode(JSON.stringify(value)));
  },
};

/** An exception as one line for the operator. */
function failure(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

/**
 * The world's exports for a role given as `{name, version, subscribes,
 * tickIntervalMs, init, onEvent, onRequest, onPacket, onTick}`; only `name`
 * is required. A handler that throws: `init` keeps the previous version
 * serving, `onEvent` is retried, `onRequest` answers 500.
 */
export function defineRole(role) {
  return {
    describe() {
      return {
        name: role.name,
        version: role.version || "0.1.0",
        subscribes: role.subscribes || [],
        tickIntervalMs: role.tickIntervalMs || 0,
      };
    },
    init() {
      try {
        if (role.init) role.init();
      } catch (error) {
        throw failure(error);
      }
    },
    onEvent(event) {
      try {
        if (role.onEvent) role.onEvent(new Event(event));
      } catch (error) {
        throw failure(error);
      }
    },
    onRequest(request) {
      const wrapped = new Request(request);
      let response;
      try {
        response = role.onRequest ? role.onRequest(wrapped) : Response.notFound(wrapped);
      } catch (error) {
        response = Response.error(500, failure(error));
      }
      return { status: response.status, headers: response.headers, body: toBytes(response.body) };
    },
    onPacket(listener, peer, data) {
      if (!role.onPacket) return undefined;
      try {
        const reply = role.onPacket(listener, peer, data);
        return reply === undefined || reply === null ? undefined : toBytes(reply);
      } catch (error) {
        hostImports.log("warn", `onPacket: ${failure(error)}`);
        return undefined;
      }
    },
    onTick() {
      try {
        if (role.onTick) role.onTick();
      } catch (error) {
        hostImports.log("warn", `onTick: ${failure(error)}`);
      }
    },
  };
}

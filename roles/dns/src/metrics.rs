//! Queries by type and response code, served by the host at `/metrics` as
//! `hivemind_counter_dns_queries_total{role="dns",qtype="A",rcode="NOERROR"}`.
//!
//! Counts are summed in the instance's memory and reported from `on-tick`
//! (once a second) or when many are pending, so answering a query makes no
//! host call. An instance that traps loses what it had not reported yet.
//! Queries the host answers from a kept reply (see `on_packet`) are counted
//! by the host under the same labels.

use std::cell::RefCell;

/// Query types counted by name; the rest are `other`, so a client sending
/// every type number cannot grow the series without bound.
const QTYPES: [(u16, &str); 12] = [
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (255, "ANY"),
];
/// Response codes by their 4-bit header value; `none` is a query that got
/// no answer (malformed, or itself a response).
const RCODES: [&str; 6] = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"];
const OTHER: &str = "other";
const NO_ANSWER: &str = "none";
/// Pending queries past which a batch is reported at once.
const FLUSH_AT: u64 = 4096;

const QTYPE_SLOTS: usize = QTYPES.len() + 1;
const RCODE_SLOTS: usize = RCODES.len() + 2;

struct Pending {
    counts: [[u64; RCODE_SLOTS]; QTYPE_SLOTS],
    total: u64,
}

thread_local! {
    static PENDING: RefCell<Pending> = const {
        RefCell::new(Pending { counts: [[0; RCODE_SLOTS]; QTYPE_SLOTS], total: 0 })
    };
}

/// The question's type, read from the wire: a question's name is never
/// compressed, so it is a run of labels ending in a zero byte.
fn query_type(query: &[u8]) -> Option<u16> {
    let mut at = 12;
    loop {
        let length = *query.get(at)? as usize;
        if length == 0 {
            break;
        }
        if length & 0xc0 != 0 {
            return None;
        }
        at += length + 1;
    }
    let bytes = query.get(at + 1..at + 3)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn qtype_slot(query: &[u8]) -> usize {
    query_type(query)
        .and_then(|qtype| QTYPES.iter().position(|(known, _)| *known == qtype))
        .unwrap_or(QTYPES.len())
}

fn rcode_slot(reply: Option<&[u8]>) -> usize {
    match reply.and_then(|reply| reply.get(3)) {
        None => RCODES.len() + 1,
        Some(flags) => {
            let rcode = (flags & 0x0f) as usize;
            if rcode < RCODES.len() { rcode } else { RCODES.len() }
        }
    }
}

fn slot_labels(qtype_index: usize, rcode_index: usize) -> (&'static str, &'static str) {
    let qtype = QTYPES.get(qtype_index).map_or(OTHER, |(_, name)| name);
    let rcode = match rcode_index {
        index if index < RCODES.len() => RCODES[index],
        index if index == RCODES.len() => OTHER,
        _ => NO_ANSWER,
    };
    (qtype, rcode)
}

/// The `qtype` and `rcode` labels a query and its reply are counted under.
pub fn labels(query: &[u8], reply: &[u8]) -> (&'static str, &'static str) {
    slot_labels(qtype_slot(query), rcode_slot(Some(reply)))
}

/// Counts one query and its answer.
pub fn record(query: &[u8], reply: Option<&[u8]>) {
    let full = PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        pending.counts[qtype_slot(query)][rcode_slot(reply)] += 1;
        pending.total += 1;
        pending.total >= FLUSH_AT
    });
    if full {
        flush();
    }
}

/// Reports what is pending to the host.
pub fn flush() {
    let counts = PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        pending.total = 0;
        std::mem::replace(&mut pending.counts, [[0; RCODE_SLOTS]; QTYPE_SLOTS])
    });
    for (qtype_index, row) in counts.iter().enumerate() {
        for (rcode_index, count) in row.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let (qtype, rcode) = slot_labels(qtype_index, rcode_index);
            if let Err(error) = hivemind_sdk::host::count("dns_queries", &[("qtype", qtype), ("rcode", rcode)], *count)
            {
                hivemind_sdk::warn!("cannot report {count} {qtype} queries answered {rcode}: {error:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The type is read after the question's labels; a name that runs past
    /// the packet or uses compression gives none.
    #[test]
    fn query_type_reads_the_question() {
        let mut query = vec![0u8; 12];
        query.extend_from_slice(b"\x03web\x07service\x04hive\x00\x00\x21\x00\x01");
        assert_eq!(query_type(&query), Some(33));
        assert_eq!(qtype_slot(&query), 8);
        query.truncate(20);
        assert_eq!(query_type(&query), None);
        let mut compressed = vec![0u8; 12];
        compressed.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01");
        assert_eq!(query_type(&compressed), None);
    }

    /// Response codes map to their names, unknown ones to `other`, and no
    /// answer to `none`.
    #[test]
    fn rcodes_map_to_bounded_labels() {
        assert_eq!(RCODES[rcode_slot(Some(&[0, 0, 0x81, 0x83]))], "NXDOMAIN");
        assert_eq!(rcode_slot(Some(&[0, 0, 0x81, 0x89])), RCODES.len());
        assert_eq!(rcode_slot(None), RCODES.len() + 1);
    }
}

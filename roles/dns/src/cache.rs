//! Replies kept by their query's bytes: a question asked again costs a
//! lookup and a copy instead of parsing, resolving and encoding.
//!
//! The key is the whole query after its ID (flags, question, EDNS and all),
//! so a kept reply is exactly the one the query would get, but for the ID,
//! which is copied from the query. Only replies that do not vary between
//! queries are kept: a service with several instances is answered in a new
//! order each time and is never kept. The table drops every kept reply when
//! it changes (`Table::rebuild`).

use std::collections::HashMap;

/// Replies kept per transport; past this the cache starts over, so a
/// client asking endless new names costs memory only up to here.
const MAX_REPLIES: usize = 4096;

#[derive(Default)]
pub struct ReplyCache {
    /// By transport (UDP truncates, TCP does not), then query after the ID.
    over_udp: HashMap<Box<[u8]>, Box<[u8]>>,
    over_tcp: HashMap<Box<[u8]>, Box<[u8]>>,
}

impl ReplyCache {
    fn replies(&mut self, over_udp: bool) -> &mut HashMap<Box<[u8]>, Box<[u8]>> {
        if over_udp {
            &mut self.over_udp
        } else {
            &mut self.over_tcp
        }
    }

    /// The kept reply to `query`, with the query's ID.
    pub fn get(&mut self, query: &[u8], over_udp: bool) -> Option<Vec<u8>> {
        let (id, rest) = query.split_at_checked(2)?;
        let kept = self.replies(over_udp).get(rest)?;
        let mut reply = kept.to_vec();
        reply[..2].copy_from_slice(id);
        Some(reply)
    }

    /// Keeps `reply` as the answer to `query`.
    pub fn put(&mut self, query: &[u8], over_udp: bool, reply: &[u8]) {
        if query.len() < 2 || reply.len() < 2 {
            return;
        }
        let replies = self.replies(over_udp);
        if replies.len() >= MAX_REPLIES {
            replies.clear();
        }
        replies.insert(query[2..].into(), reply.into());
    }

    pub fn clear(&mut self) {
        self.over_udp.clear();
        self.over_tcp.clear();
    }
}

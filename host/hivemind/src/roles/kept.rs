//! Replies a role let the host reuse (the `keep-reply` import), for one UDP
//! listener.
//!
//! A role that answers the same question the same way (the dns role for a
//! name with one address, an NXDOMAIN, a REFUSED) marks its reply as
//! reusable; the listener's thread then answers repeats of that datagram
//! itself: a hash lookup and a copy instead of a call into the role. Each
//! datagram still gets exactly the bytes the role would have sent, but for
//! the first `skip` bytes (an ID), copied from the datagram.
//!
//! Kept replies belong to one version of the role and one generation of it
//! ([`LoadedRole::kept_replies_generation`]): an event, a request, the
//! role's `forget-replies`, a trap or a new instance moves the generation
//! on, and the replies are dropped before the next datagram is looked up. A
//! reply is kept only if the generation did not move while the role built
//! it.
//!
//! Reuses add to the role's `tally` counter here, in memory, and reach the
//! role's metrics at most [`TALLY_EVERY`] later (and whenever the replies
//! are dropped), so a hot path makes no call per datagram.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hivemind_runtime::{KeepReply, LoadedRole};

/// Replies kept per listener; past this the table starts over, so a client
/// sending endless distinct datagrams costs memory only up to here.
const MAX_REPLIES: usize = 4096;
/// Bytes of datagrams and replies kept per listener, for the same reason.
const MAX_BYTES: usize = 4 << 20;
/// Distinct tally counters followed per listener (a role's series are
/// capped at 1000 anyway); a reply naming one more is not kept.
const MAX_TALLIES: usize = 256;
/// How often reuses reach the role's counters.
pub const TALLY_EVERY: Duration = Duration::from_secs(1);

type Tally = (String, Vec<(String, String)>);
/// Kept replies by the datagram's bytes after the skipped ones.
type Replies = HashMap<Box<[u8]>, Kept>;

struct Kept {
    reply: Box<[u8]>,
    /// Index into [`KeptReplies::tallies`].
    tally: Option<usize>,
}

/// Kept replies by the number of leading bytes they take from the datagram.
/// Roles use one `skip` in practice; a few are looked up in turn.
#[derive(Default)]
pub struct KeptReplies {
    /// The version the replies came from (compared by address only).
    version: Option<Arc<LoadedRole>>,
    generation: u64,
    by_skip: Vec<(usize, Replies)>,
    /// Bytes of datagrams and replies kept.
    bytes: usize,
    /// Datagrams answered here since the last tally.
    sent: u64,
    /// Counters reuses add to, and how much each is owed.
    tallies: Vec<(Tally, u64)>,
    tally_index: HashMap<Tally, usize>,
    last_tally: Option<Instant>,
}

impl KeptReplies {
    /// Drops the replies if they no longer come from `role` as it is now;
    /// returns the generation a reply must be built in to be kept.
    pub fn follow(&mut self, role: &Arc<LoadedRole>) -> u64 {
        let generation = role.kept_replies_generation();
        let same_version = self.version.as_ref().is_some_and(|version| Arc::ptr_eq(version, role));
        if !same_version || generation != self.generation {
            self.tally_reuses();
            self.clear();
            self.version = Some(role.clone());
            self.generation = generation;
        }
        generation
    }

    /// The kept reply to `datagram`, written to the end of `out` with the
    /// datagram's leading bytes; false when there is none.
    pub fn answer(&mut self, datagram: &[u8], out: &mut Vec<u8>) -> bool {
        for (skip, replies) in &self.by_skip {
            let Some(rest) = datagram.get(*skip..) else {
                continue;
            };
            if let Some(kept) = replies.get(rest) {
                let start = out.len();
                out.extend_from_slice(&kept.reply);
                out[start..start + skip].copy_from_slice(&datagram[..*skip]);
                self.sent += 1;
                if let Some(tally) = kept.tally {
                    self.tallies[tally].1 += 1;
                }
                return true;
            }
        }
        false
    }

    /// Keeps `reply` for repeats of `datagram`, if the role built it in the
    /// generation the replies follow (`built_in`, from [`Self::follow`]).
    pub fn keep(&mut self, role: &LoadedRole, built_in: u64, datagram: &[u8], reply: &[u8], keep: KeepReply) {
        let skip = keep.skip;
        if built_in != self.generation || role.kept_replies_generation() != built_in {
            return;
        }
        // The leading bytes come from each datagram, so the reply needs at
        // least as many.
        if datagram.len() < skip || reply.len() < skip {
            return;
        }
        let tally = match keep.tally {
            None => None,
            Some(tally) => match self.tally_index.get(&tally) {
                Some(index) => Some(*index),
                None if self.tallies.len() < MAX_TALLIES => {
                    self.tallies.push((tally.clone(), 0));
                    self.tally_index.insert(tally, self.tallies.len() - 1);
                    Some(self.tallies.len() - 1)
                }
                None => return,
            },
        };
        let size = datagram.len() - skip + reply.len();
        let entries: usize = self.by_skip.iter().map(|(_, replies)| replies.len()).sum();
        if entries >= MAX_REPLIES || self.bytes + size > MAX_BYTES {
            self.clear();
        }
        let replies = match self.by_skip.iter().position(|(kept_skip, _)| *kept_skip == skip) {
            Some(index) => &mut self.by_skip[index].1,
            None => {
                self.by_skip.push((skip, Replies::new()));
                &mut self.by_skip.last_mut().expect("just pushed").1
            }
        };
        let kept = Kept {
            reply: reply.into(),
            tally,
        };
        if replies.insert(datagram[skip..].into(), kept).is_none() {
            self.bytes += size;
        }
    }

    /// Adds the reuses counted since the last time to the role's counters,
    /// at most every [`TALLY_EVERY`].
    pub fn tally_now_and_then(&mut self) {
        let now = Instant::now();
        if self
            .last_tally
            .is_some_and(|last| now.duration_since(last) < TALLY_EVERY)
        {
            return;
        }
        self.last_tally = Some(now);
        self.tally_reuses();
    }

    /// Adds every reuse counted so far to the role's metrics and counters.
    pub fn tally_reuses(&mut self) {
        let Some(role) = &self.version else { return };
        if self.sent > 0 {
            role.kept_replies_sent(std::mem::take(&mut self.sent));
        }
        for ((name, labels), owed) in &mut self.tallies {
            if *owed == 0 {
                continue;
            }
            if let Err(error) = role.count(name, labels, *owed) {
                tracing::debug!(role = role.name(), counter = %name, ?error, "reused replies not counted");
            }
            *owed = 0;
        }
    }

    fn clear(&mut self) {
        self.by_skip.clear();
        self.bytes = 0;
    }
}

impl Drop for KeptReplies {
    fn drop(&mut self) {
        self.tally_reuses();
    }
}

//! Queueing one job, the part that is the same on every backend: the job's lanes and groups as
//! loaded in its transaction, the buffer of messages not written yet, Random assignment per
//! group (skipping every counter whose value a caller gave), and the bookkeeping of caller-given
//! Randoms that repeat an earlier one. No SQL: each backend's job writer loads what this needs
//! from its database, writes what it buffers, and asks it what to do in between.
//!
//! It holds nothing that outlives the job's transaction: a rolled-back job drops it whole.

use super::{EarlierRandom, FastMap, JobAccounts, NewMessage, RandomConflict, RandomSequence};

/// A lane the job adds to: its id and how many messages the job queued in it.
pub(crate) struct LaneAcc {
    pub(crate) id: i64,
    pub(crate) added: i64,
}

/// A group the job adds to.
pub(crate) struct GroupAcc {
    /// The next counter to assign.
    pub(crate) counter: i64,
    /// `random_counter` when the job loaded the group.
    pub(crate) start: i64,
    pub(crate) seq: RandomSequence,
    /// The smallest counter at or above `counter` whose value a caller gave (as far as known):
    /// assignment skips it.
    pub(crate) next_taken: Option<i64>,
}

/// A buffered message's caller-given Random, checked against the group's earlier ones when the
/// buffer is written.
pub(crate) struct CallerRandom {
    /// Position of the message in the buffer (before it is sorted).
    pub(crate) pos: usize,
    pub(crate) random: u32,
    /// Its position in the group's assigned sequence.
    pub(crate) counter: i64,
    /// The counter was already passed when the message came: an assigned value may equal it.
    pub(crate) below: bool,
}

/// A buffered message: its lane, itself, its Random and whether that was assigned.
pub(crate) type Buffered = (i64, NewMessage, u32, bool);

/// A new `caller_randoms` row: group, Random, counter, job, line, index.
pub(crate) type CallerRow<'a> = (&'a str, u32, i64, i64, i64, i64);

/// What the next assignment in a group needs.
pub(crate) enum Next {
    /// This value.
    Value(u32),
    /// A caller gave the value of this counter: the backend looks up the smallest stored caller
    /// counter above it and calls [`JobBuf::skip`], then asks again.
    Taken(i64),
}

/// The in-memory state of one job being queued.
pub(crate) struct JobBuf {
    pub(crate) job_id: i64,
    /// group → topic → lane (nested so a lookup borrows, not allocates). Looked up for every
    /// message: foldhash, not the standard library's SipHash (3% of all ingest instructions).
    pub(crate) lanes: FastMap<String, FastMap<String, LaneAcc>>,
    pub(crate) groups: FastMap<String, GroupAcc>,
    pub(crate) buf: Vec<Buffered>,
    /// Caller-given Randoms of the buffered messages (empty for files without Random).
    pub(crate) callers: Vec<CallerRandom>,
    /// Messages refused for a repeated Random (not written), in the order found.
    pub(crate) conflicts: Vec<RandomConflict>,
    pub(crate) count: i64,
    /// The job's kind and file name, to name an earlier message of the same job.
    pub(crate) kind: String,
    pub(crate) source: String,
    /// Accounts the job names (senders, owners, members) and lists with profile data: written
    /// to `accounts` at commit, in the job's transaction (see [`JobAccounts`]).
    pub(crate) accounts: JobAccounts,
}

impl JobBuf {
    pub(crate) fn new(job_id: i64, kind: &str, source: &str, capacity: usize) -> JobBuf {
        JobBuf {
            job_id,
            lanes: FastMap::default(),
            groups: FastMap::default(),
            buf: Vec::with_capacity(capacity),
            callers: Vec::new(),
            conflicts: Vec::new(),
            count: 0,
            accounts: JobAccounts::default(),
            kind: kind.to_string(),
            source: if kind == "intake" {
                "intake table".to_string()
            } else {
                source.to_string()
            },
        }
    }

    /// The lane's id, if the job loaded it.
    pub(crate) fn lane(&self, group: &str, topic: &str) -> Option<i64> {
        self.lanes
            .get(group)
            .and_then(|t| t.get(topic))
            .map(|l| l.id)
    }

    pub(crate) fn add_lane(&mut self, group: &str, topic: &str, id: i64) {
        self.lanes
            .entry(group.to_string())
            .or_default()
            .insert(topic.to_string(), LaneAcc { id, added: 0 });
    }

    /// Counts one more message of the job in the lane.
    pub(crate) fn count_in_lane(&mut self, group: &str, topic: &str) {
        if let Some(l) = self.lanes.get_mut(group).and_then(|t| t.get_mut(topic)) {
            l.added += 1;
        }
    }

    pub(crate) fn add_group(
        &mut self,
        group: &str,
        counter: i64,
        seq: RandomSequence,
        next_taken: Option<i64>,
    ) {
        self.groups.insert(
            group.to_string(),
            GroupAcc {
                counter,
                start: counter,
                seq,
                next_taken,
            },
        );
    }

    fn group(&mut self, group: &str) -> Result<&mut GroupAcc, String> {
        self.groups
            .get_mut(group)
            .ok_or_else(|| "group not loaded".to_string())
    }

    /// Notes a caller-given Random of the message about to be buffered.
    pub(crate) fn given(&mut self, group: &str, random: u32) -> Result<(), String> {
        let pos = self.buf.len();
        let g = self.group(group)?;
        let counter = i64::from(g.seq.counter_of(random));
        let below = counter < g.counter;
        if !below {
            g.next_taken = Some(g.next_taken.map_or(counter, |n| n.min(counter)));
        }
        self.callers.push(CallerRandom {
            pos,
            random,
            counter,
            below,
        });
        Ok(())
    }

    /// The group's next assigned Random, unless a caller's value occupies the next counter.
    pub(crate) fn next_assigned(&mut self, group: &str) -> Result<Next, String> {
        let g = self.group(group)?;
        let counter = g.counter;
        let Ok(c) = u32::try_from(counter) else {
            return Err(format!("group {group} has used all 2^32 Random values"));
        };
        if g.next_taken != Some(counter) {
            g.counter += 1;
            return Ok(Next::Value(g.seq.at(c)));
        }
        Ok(Next::Taken(counter))
    }

    /// Skips the taken `counter`; `stored` is the smallest caller counter above it in the
    /// database (queued before, or written by this job).
    pub(crate) fn skip(
        &mut self,
        group: &str,
        counter: i64,
        stored: Option<i64>,
    ) -> Result<(), String> {
        let buffered = self
            .callers
            .iter()
            .filter(|c| c.counter > counter && self.buf[c.pos].1.group_id == group)
            .map(|c| c.counter)
            .min();
        let next = match (stored, buffered) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let g = self.group(group)?;
        g.counter = counter + 1;
        g.next_taken = next;
        Ok(())
    }

    /// Buffers a message; true when the buffer holds `full` and is to be written.
    pub(crate) fn buffer(&mut self, row: Buffered, full: usize) -> bool {
        self.buf.push(row);
        self.count += 1;
        self.buf.len() >= full
    }

    /// The (group, Random) of each caller-given value in the buffer, in `callers` order.
    pub(crate) fn caller_keys<'a>(&'a self, callers: &[CallerRandom]) -> Vec<(&'a str, u32)> {
        callers
            .iter()
            .map(|c| (self.buf[c.pos].1.group_id.as_str(), c.random))
            .collect()
    }

    /// Marks repeats within the buffer (the first one stands) where no earlier one was found.
    pub(crate) fn repeats_in_buffer(
        &self,
        callers: &[CallerRandom],
        keys: &[(&str, u32)],
        earlier: &mut [Option<EarlierRandom>],
    ) {
        let mut first: FastMap<(&str, u32), usize> = FastMap::default();
        for (i, key) in keys.iter().enumerate() {
            if earlier[i].is_some() {
                continue;
            }
            match first.get(key) {
                Some(&f) => {
                    let m = &self.buf[callers[f].pos].1;
                    earlier[i] = Some(self.this_job(m, false));
                }
                None => {
                    first.insert(*key, i);
                }
            }
        }
    }

    /// The buffered message of the group that was assigned `random`, if any.
    pub(crate) fn assigned_in_buffer(&self, group: &str, random: u32) -> Option<EarlierRandom> {
        self.buf
            .iter()
            .find(|(_, m, r, assigned)| *assigned && *r == random && m.group_id == group)
            .map(|(_, m, _, _)| self.this_job(m, true))
    }

    fn this_job(&self, m: &NewMessage, assigned: bool) -> EarlierRandom {
        EarlierRandom {
            job_id: self.job_id,
            kind: self.kind.clone(),
            source: self.source.clone(),
            source_line: m.source_line,
            source_index: m.source_index,
            assigned,
        }
    }

    /// Records a conflict for every caller with an earlier holder; returns which buffer
    /// positions are refused and the new `caller_randoms` rows (in key order) of the others.
    pub(crate) fn settle<'a>(
        &'a mut self,
        callers: &[CallerRandom],
        earlier: &[Option<EarlierRandom>],
    ) -> (Vec<bool>, Vec<CallerRow<'a>>) {
        let mut refused = vec![false; self.buf.len()];
        for (c, e) in callers.iter().zip(earlier.iter()) {
            if let Some(e) = e {
                let m = &self.buf[c.pos].1;
                refused[c.pos] = true;
                self.conflicts.push(RandomConflict {
                    group_id: m.group_id.clone(),
                    random: c.random,
                    source_line: m.source_line,
                    source_index: m.source_index,
                    earlier: e.clone(),
                });
            }
        }
        let mut new_rows: Vec<CallerRow<'a>> = Vec::new();
        for (c, e) in callers.iter().zip(earlier.iter()) {
            if e.is_none() {
                let m = &self.buf[c.pos].1;
                new_rows.push((
                    m.group_id.as_str(),
                    c.random,
                    c.counter,
                    self.job_id,
                    m.source_line,
                    m.source_index,
                ));
            }
        }
        // In key order: fewer pages touched.
        new_rows.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        (refused, new_rows)
    }

    /// Takes the refused messages out of the buffer and out of the counts.
    pub(crate) fn drop_refused(&mut self, refused: &[bool]) {
        if !refused.iter().any(|r| *r) {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        for (pos, row) in buf.into_iter().enumerate() {
            if refused[pos] {
                let m = &row.1;
                if let Some(l) = self
                    .lanes
                    .get_mut(&m.group_id)
                    .and_then(|t| t.get_mut(&m.topic_id))
                {
                    l.added -= 1;
                }
                self.count -= 1;
            } else {
                self.buf.push(row);
            }
        }
    }

    /// (lane id, messages added) of every lane the job touched.
    pub(crate) fn lane_counts(&self) -> Vec<(i64, i64)> {
        self.lanes
            .values()
            .flat_map(|t| t.values())
            .map(|l| (l.id, l.added))
            .collect()
    }

    /// (group, new random_counter) of every group whose counter moved.
    pub(crate) fn moved_counters(&self) -> Vec<(&str, i64)> {
        self.groups
            .iter()
            .filter(|(_, acc)| acc.counter != acc.start)
            .map(|(g, acc)| (g.as_str(), acc.counter))
            .collect()
    }

    pub(crate) fn group_count(&self) -> i64 {
        i64::try_from(self.groups.len()).unwrap_or(i64::MAX)
    }
}

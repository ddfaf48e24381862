//! The chunk tree of a job, shared by the workers of this process: the top chunks of the job's
//! time range, and below each split chunk the children its record names. Work is handed out
//! from it (staged chunks first, then in order), and "done" is derived from it, never assumed:
//! the job is done when every top chunk is covered, a chunk being covered when its record says
//! done, or split with every child covered.

use super::chunks::Chunk;
use super::store::{DONE, Record, SPLIT, STAGED};
use crate::spec::ClickhouseSpec;
use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Default)]
pub struct Tree {
    pub top: Vec<Chunk>,
    pub records: HashMap<String, Record>,
    queue: VecDeque<Chunk>,
    in_flight: HashSet<String>,
    /// Chunks that failed for good in this run: not handed out again.
    failed: HashSet<String>,
}

/// What a claim found.
pub enum Next {
    Chunk(Chunk),
    /// Nothing to hand out; `busy` chunks are being worked on by this process.
    Wait {
        busy: usize,
    },
    Done,
}

impl Tree {
    /// The tree of `top` chunks as `records` describe it.
    pub fn new(spec: &ClickhouseSpec, top: Vec<Chunk>, records: Vec<Record>) -> Tree {
        let mut t = Tree {
            top,
            records: records.into_iter().map(|r| (r.chunk.clone(), r)).collect(),
            ..Tree::default()
        };
        t.rebuild(spec);
        t
    }

    /// Queue every chunk that is not covered, staged ones first.
    fn rebuild(&mut self, spec: &ClickhouseSpec) {
        let mut staged = Vec::new();
        let mut rest = Vec::new();
        let top = self.top.clone();
        for c in &top {
            self.collect(spec, c, &mut staged, &mut rest);
        }
        self.queue = staged.into_iter().chain(rest).collect();
    }

    fn collect(
        &self,
        spec: &ClickhouseSpec,
        c: &Chunk,
        staged: &mut Vec<Chunk>,
        rest: &mut Vec<Chunk>,
    ) {
        let id = c.id(spec);
        match self.records.get(&id).map(|r| r.status.as_str()) {
            Some(DONE) => {}
            Some(SPLIT) => {
                for kid in self.children(&id) {
                    self.collect(spec, &kid, staged, rest);
                }
            }
            Some(STAGED) => staged.push(c.clone()),
            _ => rest.push(c.clone()),
        }
    }

    /// Chunks recorded `staged` that this tree will never hand out: the job's ladder, range or
    /// split column changed since they were staged, so their ids are not in it.
    pub fn unreachable_staged(&self, spec: &ClickhouseSpec) -> Vec<String> {
        let queued: HashSet<String> = self.queue.iter().map(|c| c.id(spec)).collect();
        let mut ids: Vec<String> = self
            .records
            .values()
            .filter(|r| r.status == STAGED && !queued.contains(&r.chunk))
            .map(|r| r.chunk.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The children a split chunk's record names, from their own records' definitions.
    pub fn children(&self, id: &str) -> Vec<Chunk> {
        let Some(r) = self.records.get(id) else {
            return Vec::new();
        };
        r.children
            .iter()
            .filter_map(|k| {
                self.records
                    .get(k)
                    .and_then(|kr| serde_json::from_str::<Chunk>(&kr.def).ok())
            })
            .collect()
    }

    fn covered(&self, spec: &ClickhouseSpec, c: &Chunk) -> bool {
        let id = c.id(spec);
        match self.records.get(&id) {
            Some(r) if r.status == DONE => true,
            Some(r) if r.status == SPLIT => {
                let kids = self.children(&id);
                kids.len() == r.children.len() && kids.iter().all(|k| self.covered(spec, k))
            }
            _ => false,
        }
    }

    /// Every top chunk covered.
    pub fn done(&self, spec: &ClickhouseSpec) -> bool {
        self.top.iter().all(|c| self.covered(spec, c))
    }

    /// The next chunk to work on.
    pub fn next(&mut self, spec: &ClickhouseSpec) -> Next {
        while let Some(c) = self.queue.pop_front() {
            let id = c.id(spec);
            if self.in_flight.contains(&id) || self.failed.contains(&id) {
                continue;
            }
            if self.covered(spec, &c) {
                continue;
            }
            self.in_flight.insert(id);
            return Next::Chunk(c);
        }
        if !self.in_flight.is_empty() {
            return Next::Wait {
                busy: self.in_flight.len(),
            };
        }
        if self.done(spec) {
            return Next::Done;
        }
        // Work is left that is not queued (a chunk given back): queue it again.
        self.rebuild(spec);
        self.queue.retain(|c| !self.failed.contains(&c.id(spec)));
        if self.queue.is_empty() {
            Next::Wait { busy: 0 }
        } else {
            self.next(spec)
        }
    }

    /// A record changed (this process wrote it).
    pub fn update(&mut self, r: Record) {
        self.records.insert(r.chunk.clone(), r);
    }

    /// The chunk was split: its children go to the front of the queue, in order.
    pub fn split(&mut self, spec: &ClickhouseSpec, parent: &Chunk, kids: Vec<Chunk>) {
        self.in_flight.remove(&parent.id(spec));
        for k in kids.into_iter().rev() {
            self.queue.push_front(k);
        }
    }

    /// The worker is finished with the chunk (done, or given back to be worked on again).
    pub fn finish(&mut self, spec: &ClickhouseSpec, c: &Chunk, again: bool) {
        self.in_flight.remove(&c.id(spec));
        if again {
            self.queue.push_front(c.clone());
        }
    }

    /// The chunk failed for good in this run.
    pub fn fail(&mut self, spec: &ClickhouseSpec, c: &Chunk) {
        let id = c.id(spec);
        self.in_flight.remove(&id);
        self.failed.insert(id);
    }

    /// Per level (`month`, `day`, `split`): the rows of the smallest chunk whose attempt ran
    /// out of memory with the normal settings, and with lighter ones. Chunks of a level at
    /// least that large start with lighter settings, or a rung lower.
    pub fn learned(&self) -> (HashMap<String, u64>, HashMap<String, u64>) {
        let (mut normal, mut light) = (HashMap::new(), HashMap::new());
        for r in self.records.values() {
            if r.code != u64::from(super::errors::MEMORY_LIMIT_EXCEEDED) || r.source_rows == 0 {
                continue;
            }
            // A chunk that failed with lighter settings failed with the normal ones first.
            let learn = |m: &mut HashMap<String, u64>| {
                let e = m.entry(r.level.clone()).or_insert(r.source_rows);
                *e = (*e).min(r.source_rows);
            };
            learn(&mut normal);
            if r.light > 0 {
                learn(&mut light);
            }
        }
        (normal, light)
    }
}

//! Workers and the forwarding pipeline. Each worker owns a set of tasks (NIC VM queues, the
//! NIC default queue, ports' own TX) and runs them in batches of [`BATCH`]; it spins briefly when
//! idle and then sleeps on an epoll of its wake-up eventfd and its sources' wake fds, without a
//! timeout unless some source must be polled: an idle worker costs nothing.
//!
//! Fast path (`vmq` mode): a NIC VM queue's frames go straight to their VM — no switch, no FDB;
//! a VM's unicast frames go straight to the local VM they address or to its uplink. Everything
//! else (the default queue; every frame in `switch` mode) goes through the software switch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmq_core::fdb::MixMap;
use vmq_core::stats::PortStats;
use vmq_core::switch::{
    Dest, LearnRequest, Switch, TagEdit, Verdict, admit_vlan, egress_tag, fits_mtu, source_allowed,
};
use vmq_core::vmq::QueueId;
use vmq_core::{DropReason, Mode, PortId, PortSpec};
use vmq_wire::VnetHdr;
use vmq_wire::ethernet::parse_l2;
use vmq_wire::vlan;

use crate::egress::{EgressScratch, EgressTally, OutPort, apply_edit, deliver, is_tcp_candidate};
use crate::port::{BATCH, FrameSource, GuestTail, KernelCounters, PortSinks, RecvError, Scratch, Wake};
use vmq_offload::Coalescer;

/// How long a worker keeps polling after its last frame before it sleeps: long enough to catch
/// the next burst of a busy flow without a wake-up, short enough not to take a core the
/// endpoints (a VM's vCPU, the stacks behind TAPs) may need.
const SPIN_TIME: Duration = Duration::from_micros(50);
/// Sleep while some task has no wake fd (NIC stand-ins): bounds how late it is polled.
const POLL_SLEEP: Duration = Duration::from_millis(1);
/// How often a port at its learning limit may take the switch's write lock (see
/// `Worker::apply_learning`).
const LIMITED_LEARN_INTERVAL_NS: u64 = 1_000_000;
/// Event token of a worker's wake-up eventfd.
const WAKE_TOKEN: u64 = 0;

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct PortEntry {
    pub spec: PortSpec,
    pub stats: Arc<PortStats>,
    /// Shared by every version of the port table: a spec change (MTU, VLAN) makes a new entry
    /// around the same sink and counters.
    pub sinks: PortSinks,
    /// The uplink this port's traffic leaves by in `vmq` mode.
    pub uplink: Option<PortId>,
    /// VM ports whose guest's receive filter was relayed (QMP): what the switch may deliver.
    pub rx_filter: Option<Arc<vmq_core::rxfilter::RxFilter>>,
}

/// The ports as the workers see them: an immutable snapshot, replaced as a whole by the
/// control plane (copy on write) and picked up by each worker between batches.
#[derive(Default)]
pub(crate) struct PortTable {
    /// Indexed by `PortId`.
    pub ports: Vec<Option<Arc<PortEntry>>>,
    /// Local VM/TAP addresses (MAC, VLAN) → port: the `vmq` mode fast path for VM TX.
    pub local: MixMap<u64, PortId>,
}

impl PortTable {
    pub fn get(&self, id: PortId) -> Option<&Arc<PortEntry>> {
        self.ports.get(id.0 as usize).and_then(Option::as_ref)
    }
}

/// What a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskKind {
    /// A NIC VM queue: frames the NIC's filter for one VM sorted into it. Which VM that is
    /// changes with the dynamic policy, so frames are matched to their VM by address.
    VmQueue { uplink: PortId, queue: QueueId },
    /// A NIC default queue: everything without a VM queue, through the switch.
    DefaultQueue { uplink: PortId },
    /// A port's own transmissions.
    PortTx { port: PortId },
}

impl TaskKind {
    /// The port frames of this task enter by.
    pub fn in_port(self) -> PortId {
        match self {
            TaskKind::VmQueue { uplink, .. } | TaskKind::DefaultQueue { uplink } => uplink,
            TaskKind::PortTx { port } => port,
        }
    }
}

pub(crate) struct Task {
    pub kind: TaskKind,
    pub source: Mutex<Box<dyn FrameSource>>,
    /// Frames this task took in (for load-based placement).
    pub frames: AtomicU64,
    /// The counters of the port frames of this task enter by: frames taken while the port is
    /// already gone from the worker's port table (removed mid-batch) are counted there.
    pub stats: Arc<PortStats>,
    /// The interface receive queue a NIC queue task reads, where the uplink has several.
    pub nic_rx_queue: Option<u16>,
}

impl Task {
    pub fn new(kind: TaskKind, source: Box<dyn FrameSource>, stats: Arc<PortStats>) -> Arc<Task> {
        let nic_rx_queue = source.nic_rx_queue();
        Arc::new(Task { kind, source: Mutex::new(source), frames: AtomicU64::new(0), stats, nic_rx_queue })
    }
}

/// A worker's task list; the control plane replaces it when it moves queues between workers,
/// and bumps its generation when a source's wake fd may have changed.
#[derive(Default)]
pub(crate) struct TaskList {
    pub tasks: Mutex<Vec<Arc<Task>>>,
    pub generation: AtomicU64,
}

impl TaskList {
    pub fn set(&self, tasks: Vec<Arc<Task>>) {
        *lock(&self.tasks) = tasks;
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// Per-worker counters, read by the control plane (busy ratio, placement).
#[derive(Default)]
pub(crate) struct WorkerStats {
    /// Time spent in loop rounds that moved frames.
    pub busy_ns: AtomicU64,
    pub frames: AtomicU64,
    /// Panics caught in this worker (see `supervise`).
    pub panics: AtomicU64,
    /// How long learning held the switch's write lock (every other worker waits meanwhile).
    pub learn_lock: LockHold,
    /// Times the worker ran out of work and tried to sleep: none when idle (it sleeps until a
    /// source or the control plane wakes it), a thousand a second while a source must be
    /// polled, thousands when a source keeps it awake without giving it frames.
    pub sleeps: AtomicU64,
    /// True while the worker waits in epoll for a wake-up: idle, not stalled (a worker with no
    /// work sleeps without a timeout, so its counters stand still).
    pub asleep: AtomicBool,
}

/// Time a lock was held, per batch: count, total and longest.
#[derive(Default)]
pub(crate) struct LockHold {
    pub batches: AtomicU64,
    pub total_ns: AtomicU64,
    pub max_ns: AtomicU64,
}

impl LockHold {
    fn record(&self, held: Duration) {
        let ns = held.as_nanos() as u64;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

pub(crate) struct Shared {
    pub mode: Mode,
    table: Mutex<Arc<PortTable>>,
    table_generation: AtomicU64,
    pub switch: RwLock<Switch>,
    pub lists: Vec<Arc<TaskList>>,
    pub wakes: Vec<EventFd>,
    pub worker_stats: Vec<WorkerStats>,
    pub stop: AtomicBool,
    pub epoch: Instant,
    /// Test hook: the next batch of any worker panics (holding the switch's write lock).
    #[cfg(test)]
    pub inject_panic: AtomicBool,
}

impl Shared {
    pub fn new(mode: Mode, switch: Switch, workers: usize) -> std::io::Result<Shared> {
        Ok(Shared {
            mode,
            table: Mutex::new(Arc::new(PortTable::default())),
            table_generation: AtomicU64::new(0),
            switch: RwLock::new(switch),
            lists: (0..workers).map(|_| Arc::new(TaskList::default())).collect(),
            wakes: (0..workers).map(|_| new_wake()).collect::<std::io::Result<_>>()?,
            worker_stats: (0..workers).map(|_| WorkerStats::default()).collect(),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
            #[cfg(test)]
            inject_panic: AtomicBool::new(false),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn table(&self) -> Arc<PortTable> {
        lock(&self.table).clone()
    }

    /// The current port table as a worker's own copy. A worker clones its table `Arc` every
    /// batch; on one `Arc` shared by all workers that reference count is a cache line written
    /// by every core (and it sits beside the table's own header, which every lookup reads).
    pub fn worker_table(&self) -> Arc<PortTable> {
        let table = self.table();
        Arc::new(PortTable { ports: table.ports.clone(), local: table.local.clone() })
    }

    /// Installs a new port table; workers switch to it before their next batch.
    pub fn publish(&self, table: PortTable) {
        *lock(&self.table) = Arc::new(table);
        self.table_generation.fetch_add(1, Ordering::Release);
    }

    pub fn switch_read(&self) -> std::sync::RwLockReadGuard<'_, Switch> {
        self.switch.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn switch_write(&self) -> std::sync::RwLockWriteGuard<'_, Switch> {
        self.switch.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A port's attachment came up or went away (VM connected, TAP deleted): the switch stops
    /// flooding to it, and workers re-read their sources' wake fds.
    pub fn set_port_up(&self, port: PortId, up: bool) {
        let changed = {
            let mut sw = self.switch_write();
            let was = sw.is_up(port);
            sw.set_port_up(port, up);
            was != up
        };
        if changed {
            tracing::info!(port = port.0, up, "port state");
        }
        self.refresh_workers();
    }

    /// Makes every worker re-read its task list and its sources' wake fds now.
    pub fn refresh_workers(&self) {
        for list in &self.lists {
            list.generation.fetch_add(1, Ordering::Release);
        }
        for wake in &self.wakes {
            let _ = wake.write(1);
        }
    }
}

pub(crate) fn local_key(mac: vmq_wire::MacAddr, vlan: u16) -> u64 {
    mac.to_u64() | (u64::from(vlan) << 48)
}

#[derive(Clone, Copy)]
struct Delivery {
    port: PortId,
    frame: u8,
    edit: TagEdit,
    /// Multiqueue ports: the lane (guest RX queue), set at delivery.
    lane: u8,
}

/// The per-frame decision step, borrowing only what it writes.
struct Decisions<'a> {
    shared: &'a Shared,
    table: &'a PortTable,
    deliveries: &'a mut Vec<Delivery>,
    learn: &'a mut Vec<LearnRequest>,
    flood: &'a mut Vec<PortId>,
    /// Ports whose guest's receive filter refused a frame of this batch (one entry a frame).
    filtered: &'a mut Vec<PortId>,
    /// The `vmq` fast path's last decision in this batch, see [`FastDest`].
    last_dest: &'a mut Option<FastDest>,
}

/// A `vmq`-mode TX decision kept for the rest of its batch: frames of one batch mostly go to
/// the same place (one flow, or a VM talking to one peer), and the table and the in-port cannot
/// change within a batch, so the same (destination, VLAN, tagged) gets the same port and tag
/// edit without the address lookup. The per-frame checks (VLAN admission, source, MTU) still run.
#[derive(Clone, Copy)]
pub(crate) struct FastDest {
    key: u64,
    tagged: bool,
    port: PortId,
    edit: TagEdit,
}

/// A received frame as the decisions see it: its head (every header; the whole frame unless its
/// end is still in a guest's memory) and its full length.
struct Incoming<'f> {
    head: &'f [u8],
    len: usize,
    /// GSO frames: the length of one segment on the wire (what the MTU limits).
    segment_len: Option<usize>,
    /// Position in the batch.
    index: u8,
}

impl Decisions<'_> {
    /// A frame from a NIC VM queue: the NIC matched its filter; only the tag changes.
    fn vm_queue_frame(&mut self, uplink: PortId, f: &Incoming<'_>, now: u64) -> Result<(), DropReason> {
        let l2 = parse_l2(f.head).map_err(|_| DropReason::Malformed)?;
        // No station sends from a group address: the switch path drops these too (as a Linux
        // bridge does), so the NIC's filter match must not let one through.
        if l2.src.is_multicast() {
            return Err(DropReason::Malformed);
        }
        let vlan = l2.vlan.unwrap_or(0);
        let Some(&port) = self.table.local.get(&local_key(l2.dst, vlan)) else {
            // A frame the filter did not really mean for a local VM (filter being moved):
            // the switch decides, as for the default queue.
            return self.switch_frame(uplink, f, now);
        };
        let entry = self.table.get(port).ok_or(DropReason::PortDown)?;
        let edit = egress_tag(&entry.spec.vlan, vlan, l2.vlan.is_some()).ok_or(DropReason::Vlan)?;
        self.deliveries.push(Delivery { port, frame: f.index, edit, lane: 0 });
        Ok(())
    }

    /// A VM's (or TAP's) frame in `vmq` mode: policy, then straight to a local port or the
    /// uplink; group traffic goes through the switch.
    fn fast_tx_frame(
        &mut self,
        in_entry: &PortEntry,
        in_port: PortId,
        f: &Incoming<'_>,
        now: u64,
    ) -> Result<(), DropReason> {
        let l2 = parse_l2(f.head).map_err(|e| match e {
            vmq_wire::WireError::Unsupported => DropReason::Unsupported,
            _ => DropReason::Malformed,
        })?;
        if l2.dst.is_multicast() {
            return self.switch_frame(in_port, f, now);
        }
        let spec = &in_entry.spec;
        let vlan = admit_vlan(&spec.vlan, l2.vlan)?;
        if l2.src.is_multicast() {
            return Err(DropReason::Malformed);
        }
        if !source_allowed(spec, l2.src) {
            return Err(DropReason::Spoofed);
        }
        if !fits_mtu(f.len, l2.header_len, f.segment_len, spec.mtu) {
            return Err(DropReason::Oversize);
        }
        let key = local_key(l2.dst, vlan);
        let tagged = l2.vlan.is_some();
        if let Some(last) = *self.last_dest
            && last.key == key
            && last.tagged == tagged
        {
            self.deliveries.push(Delivery { port: last.port, frame: f.index, edit: last.edit, lane: 0 });
            return Ok(());
        }
        let out = match self.table.local.get(&key) {
            Some(&p) if p == in_port => return Err(DropReason::NoDestination),
            Some(&p) => p,
            None => match in_entry.uplink {
                Some(u) => u,
                None => return self.switch_frame(in_port, f, now),
            },
        };
        let out_entry = self.table.get(out).ok_or(DropReason::PortDown)?;
        let edit = egress_tag(&out_entry.spec.vlan, vlan, tagged).ok_or(DropReason::Vlan)?;
        *self.last_dest = Some(FastDest { key, tagged, port: out, edit });
        self.deliveries.push(Delivery { port: out, frame: f.index, edit, lane: 0 });
        Ok(())
    }

    /// Does the receive filter of `port`'s guest (if one was relayed) refuse this frame, as it
    /// would leave with `edit`? Only the switch path needs it: the VM queue and the `vmq` fast
    /// path deliver to a port's own MAC on an access port, which every filter takes.
    fn rx_filter_refuses(&self, port: PortId, head: &[u8], vlan: u16, tagged: bool, edit: TagEdit) -> bool {
        let Some(entry) = self.table.get(port) else { return false };
        let Some(filter) = entry.rx_filter.as_deref() else { return false };
        let Some(dst) = head.get(..6).and_then(|d| <[u8; 6]>::try_from(d).ok()) else { return false };
        let tag = match edit {
            TagEdit::Push(v) => Some(v),
            TagEdit::Strip => None,
            TagEdit::Keep => tagged.then_some(vlan),
        };
        !filter.admits(entry.spec.mac, vmq_wire::MacAddr(dst), tag)
    }

    /// The software switch path.
    fn switch_frame(&mut self, in_port: PortId, f: &Incoming<'_>, now: u64) -> Result<(), DropReason> {
        let sw = self.shared.switch_read();
        match sw.classify_head(in_port, f.head, f.len, f.segment_len, now) {
            Verdict::Drop(r) => Err(r),
            Verdict::Forward { vlan, dst, learn } => {
                if let Some(req) = learn {
                    self.learn.push(req);
                }
                let tagged = vlan::is_tagged(f.head);
                match dst {
                    Dest::Port(p) => {
                        let Some(edit) = sw.egress(p, vlan, tagged) else {
                            return Err(if sw.is_up(p) { DropReason::Vlan } else { DropReason::PortDown });
                        };
                        if self.rx_filter_refuses(p, f.head, vlan, tagged, edit) {
                            self.filtered.push(p);
                            return Ok(());
                        }
                        self.deliveries.push(Delivery { port: p, frame: f.index, edit, lane: 0 });
                    }
                    Dest::Flood => {
                        self.flood.clear();
                        self.flood.extend(sw.flood_ports(vlan, in_port));
                        if self.flood.is_empty() {
                            return Err(DropReason::NoDestination);
                        }
                        for &p in self.flood.iter() {
                            if let Some(edit) = sw.egress(p, vlan, tagged) {
                                if self.rx_filter_refuses(p, f.head, vlan, tagged, edit) {
                                    self.filtered.push(p);
                                    continue;
                                }
                                self.deliveries.push(Delivery { port: p, frame: f.index, edit, lane: 0 });
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// A worker: its tasks, and the buffers it reuses for every batch.
pub(crate) struct Worker {
    index: usize,
    shared: Arc<Shared>,
    list: Arc<TaskList>,
    tasks: Vec<Arc<Task>>,
    table: Arc<PortTable>,
    seen_table: u64,
    /// Sleeps on the wake-up eventfd (shutdown, reconfiguration) and the sources' wake fds.
    epoll: Epoll,
    /// Fds currently registered for the tasks (token = task index + 1).
    registered: Vec<RawFd>,
    /// Some task has no wake fd ([`Wake::Poll`]): sleep only briefly so that it is polled.
    has_polled_task: bool,
    /// Per task: worth polling now. Cheap sources always are; costly ones (a syscall per poll)
    /// only from an epoll report until they are drained.
    ready: Vec<bool>,
    costly: Vec<bool>,
    /// Costly tasks drained and waiting for epoll.
    waiting_costly: usize,
    scratch: Scratch,
    egress: EgressScratch,
    errors: Vec<RecvError>,
    deliveries: Vec<Delivery>,
    learn: Vec<LearnRequest>,
    /// When learning last took the write lock for a port at its limit.
    last_limited_learn: u64,
    flood: Vec<PortId>,
    filtered: Vec<PortId>,
    /// Live lanes of the multiqueue port being delivered to.
    live_lanes: Vec<u8>,
    /// The clock at the start of the current round, ns since `Shared::epoch`.
    now_ns: u64,
    /// See [`FastDest`]; cleared at the start of every batch.
    last_dest: Option<FastDest>,
    hdrs: Vec<VnetHdr>,
    coalescer: Coalescer,
    rsc_buf: Vec<u8>,
}

pub(crate) fn new_wake() -> std::io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK)
}

impl Worker {
    pub fn new(shared: Arc<Shared>, index: usize) -> std::io::Result<Worker> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, shared.wakes[index].as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))?;
        Ok(Worker {
            index,
            list: shared.lists[index].clone(),
            table: shared.worker_table(),
            seen_table: u64::MAX,
            shared,
            tasks: Vec::new(),
            epoll,
            registered: Vec::new(),
            has_polled_task: false,
            ready: Vec::new(),
            costly: Vec::new(),
            waiting_costly: 0,
            scratch: Scratch::new(),
            egress: EgressScratch::default(),
            errors: Vec::new(),
            deliveries: Vec::with_capacity(BATCH * 4),
            learn: Vec::new(),
            last_limited_learn: 0,
            flood: Vec::new(),
            filtered: Vec::new(),
            live_lanes: Vec::with_capacity(32),
            now_ns: 0,
            last_dest: None,
            hdrs: Vec::with_capacity(BATCH),
            coalescer: Coalescer::new(),
            rsc_buf: Vec::new(),
        })
    }

    pub fn run(mut self) {
        let mut last_work = Instant::now();
        // The start of the last round that moved frames, not yet added to `busy_ns`: a round's
        // time is accounted at the next round's start, so a round reads the clock once (with a
        // TAP or packet socket per batch, clock reads were 3 to 6 % of vmq's samples).
        let mut busy_since: Option<Instant> = None;
        let mut seen_tasks = u64::MAX;
        let stats = &self.shared.clone().worker_stats[self.index];
        while !self.shared.stop.load(Ordering::Relaxed) {
            let generation = self.list.generation.load(Ordering::Acquire);
            if generation != seen_tasks {
                seen_tasks = generation;
                self.tasks = lock(&self.list.tasks).clone();
                self.register_wake_fds();
            }
            let table_generation = self.shared.table_generation.load(Ordering::Acquire);
            if table_generation != self.seen_table {
                self.seen_table = table_generation;
                self.table = self.shared.worker_table();
            }
            // Sources polled by syscall (TAP reads) are read only once epoll says they have
            // something: one epoll_wait instead of an EAGAIN read per source per round.
            if self.waiting_costly > 0 {
                self.harvest_events(0);
            }
            let round = Instant::now();
            if let Some(start) = busy_since.take() {
                stats.busy_ns.fetch_add((round - start).as_nanos() as u64, Ordering::Relaxed);
            }
            self.now_ns = (round - self.shared.epoch).as_nanos() as u64;
            let mut work = 0;
            for i in 0..self.tasks.len() {
                if !self.ready[i] {
                    continue;
                }
                let task = self.tasks[i].clone();
                let n = self.run_task(&task);
                if n < BATCH && self.costly[i] {
                    // Drained: wait for epoll to report it readable again.
                    self.ready[i] = false;
                    self.waiting_costly += 1;
                }
                work += n;
            }
            if work > 0 {
                stats.frames.fetch_add(work as u64, Ordering::Relaxed);
                busy_since = Some(round);
                last_work = round;
            } else if round - last_work < SPIN_TIME {
                std::hint::spin_loop();
            } else {
                self.sleep();
                last_work = Instant::now();
            }
        }
    }

    /// Registers the wake fds of the current tasks (and forgets the previous ones).
    fn register_wake_fds(&mut self) {
        for fd in self.registered.drain(..) {
            // The fd may be closed already (epoll forgot it then): nothing to undo.
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.has_polled_task = false;
        // Every task is polled once after a change; costly ones then wait for epoll.
        self.ready = vec![true; self.tasks.len()];
        self.costly = vec![false; self.tasks.len()];
        self.waiting_costly = 0;
        for (i, task) in self.tasks.iter().enumerate() {
            let mut source = lock(&task.source);
            match source.wake() {
                Wake::Fd(fd) => {
                    let event = EpollEvent::new(EventSet::IN, i as u64 + 1);
                    match self.epoll.ctl(ControlOperation::Add, fd, event) {
                        Ok(()) => {
                            self.registered.push(fd);
                            self.costly[i] = !source.polls_cheaply();
                        }
                        Err(e) => {
                            tracing::warn!(worker = self.index, fd, error = %e, "cannot wait on a source; polling it");
                            self.has_polled_task = true;
                        }
                    }
                }
                Wake::Poll => self.has_polled_task = true,
                // Nothing to poll until the next refresh asks again.
                Wake::Never => self.ready[i] = false,
            }
        }
    }

    /// Takes what epoll reports (waiting up to `timeout_ms`): wake-ups, sources with work.
    fn harvest_events(&mut self, timeout_ms: i32) {
        let mut events = [EpollEvent::default(); 32];
        let n = self.epoll.wait(timeout_ms, &mut events).unwrap_or(0);
        for event in &events[..n] {
            match event.data() {
                WAKE_TOKEN => {
                    let _ = self.shared.wakes[self.index].read();
                }
                token => {
                    let i = token as usize - 1;
                    if let Some(task) = self.tasks.get(i) {
                        lock(&task.source).on_wake();
                        if !self.ready[i] {
                            self.ready[i] = true;
                            self.waiting_costly -= 1;
                        }
                    }
                }
            }
        }
    }

    /// Arms notifications and sleeps until a source or the control plane wakes the worker.
    fn sleep(&mut self) {
        self.shared.worker_stats[self.index].sleeps.fetch_add(1, Ordering::Relaxed);
        let mut pending = false;
        for task in &self.tasks {
            pending |= lock(&task.source).prepare_sleep();
        }
        if !pending {
            // Every other source wakes the worker (an AF_PACKET ring block with frames in it
            // is retired after its timeout and makes the socket readable), and so does the
            // control plane: no timer.
            let timeout_ms = if self.has_polled_task { POLL_SLEEP.as_millis() as i32 } else { -1 };
            let shared = self.shared.clone();
            let asleep = &shared.worker_stats[self.index].asleep;
            asleep.store(true, Ordering::Relaxed);
            self.harvest_events(timeout_ms);
            asleep.store(false, Ordering::Relaxed);
        }
        for task in &self.tasks {
            lock(&task.source).wake_up();
        }
    }

    /// Runs one batch of `task`; returns frames taken.
    pub fn run_task(&mut self, task: &Task) -> usize {
        self.scratch.clear();
        self.errors.clear();
        let (n, kernel) = {
            let mut source = lock(&task.source);
            let n = source.recv(&mut self.scratch, BATCH, &mut self.errors);
            (n, source.kernel_counters())
        };
        if kernel != KernelCounters::default()
            && let Some(entry) = self.table.get(task.kind.in_port())
        {
            entry.stats.kernel_drops.fetch_add(kernel.drops, Ordering::Relaxed);
            entry.stats.corrupt_blocks.fetch_add(kernel.corrupt_blocks, Ordering::Relaxed);
        }
        let n = self.process(task, n);
        if self.scratch.has_tails() {
            // Everything is delivered: the sender may have its buffers back.
            self.scratch.clear();
            lock(&task.source).complete();
        }
        n
    }

    /// Decides and delivers the `n` frames of `task` now in the scratch batch.
    fn process(&mut self, task: &Task, n: usize) -> usize {
        let in_port = task.kind.in_port();
        let worker = self.index;
        let table = self.table.clone();
        let Some(in_entry) = table.get(in_port) else {
            // The port was removed while this task still ran: its frames go nowhere, but every
            // frame taken is counted (on the port's own counters, which the task holds).
            let stats = &task.stats;
            for e in self.errors.drain(..) {
                match e {
                    RecvError::Drop(r) => {
                        stats.add_rx(worker, 1, 0);
                        stats.add_drop(r, 1);
                    }
                    RecvError::RingBroken => stats.add_drop(DropReason::RingBroken, 1),
                    RecvError::Gone => {}
                }
            }
            let bytes = (0..n).map(|i| self.scratch.frame_len(i).saturating_sub(VnetHdr::LEN) as u64).sum();
            stats.add_rx(worker, n as u64, bytes);
            stats.add_drop(DropReason::PortDown, n as u64);
            return n;
        };
        for e in self.errors.drain(..) {
            match e {
                RecvError::Drop(r) => {
                    in_entry.stats.add_rx(worker, 1, 0);
                    in_entry.stats.add_drop(r, 1);
                }
                RecvError::RingBroken => {
                    tracing::warn!(port = %in_entry.spec.name, "guest broke its TX ring; not served until it resets it");
                    in_entry.stats.add_drop(DropReason::RingBroken, 1);
                }
                RecvError::Gone => {
                    tracing::warn!(port = %in_entry.spec.name, "attachment gone; port down");
                    self.shared.set_port_up(in_port, false);
                }
            }
        }
        if n == 0 {
            return 0;
        }
        task.frames.fetch_add(n as u64, Ordering::Relaxed);
        #[cfg(test)]
        if self.shared.inject_panic.swap(false, Ordering::Relaxed) {
            let _poisoned = self.shared.switch_write();
            panic!("injected worker panic");
        }
        // The round's clock (see `run`): frames of one round share a timestamp.
        let now = self.now_ns;
        self.deliveries.clear();
        self.hdrs.clear();
        self.last_dest = None;
        let mut rx_bytes = 0u64;
        for i in 0..n {
            let raw = self.scratch.get(i);
            let raw_len = self.scratch.frame_len(i);
            rx_bytes += raw_len.saturating_sub(VnetHdr::LEN) as u64;
            let hdr = match VnetHdr::parse(raw) {
                Ok(h) if h.validate(raw_len - VnetHdr::LEN).is_ok() => h,
                _ => {
                    in_entry.stats.add_drop(DropReason::Malformed, 1);
                    self.hdrs.push(VnetHdr::default());
                    continue;
                }
            };
            self.hdrs.push(hdr);
            if !vmq_offload::gso_size_acceptable(&hdr) {
                // A tiny gso_size multiplies the work of every hop after this one.
                in_entry.stats.add_drop(DropReason::Offload, 1);
                continue;
            }
            let head = &raw[VnetHdr::LEN..];
            let len = raw_len - VnetHdr::LEN;
            let f =
                Incoming { head, len, segment_len: vmq_offload::gso_segment_len_in(&hdr, head, len), index: i as u8 };
            let mut d = Decisions {
                shared: &self.shared,
                table: &table,
                deliveries: &mut self.deliveries,
                learn: &mut self.learn,
                flood: &mut self.flood,
                filtered: &mut self.filtered,
                last_dest: &mut self.last_dest,
            };
            let result = match task.kind {
                TaskKind::VmQueue { uplink, .. } => d.vm_queue_frame(uplink, &f, now),
                TaskKind::PortTx { port } if self.shared.mode == Mode::Vmq => d.fast_tx_frame(in_entry, port, &f, now),
                _ => d.switch_frame(in_port, &f, now),
            };
            if let Err(r) = result {
                in_entry.stats.add_drop(r, 1);
                // Named in the control thread's warning (see `spoof`); drop path only.
                if r == DropReason::Spoofed
                    && let Some(src) = f.head.get(6..12).and_then(|s| <[u8; 6]>::try_from(s).ok())
                {
                    in_entry.stats.note_spoofed_source(src);
                }
            }
        }
        in_entry.stats.add_rx(worker, n as u64, rx_bytes);
        self.count_filtered(&table);
        self.apply_learning(now, in_entry);
        self.flush_deliveries(in_entry);
        n
    }

    /// Counts the batch's receive-filter refusals on the VM ports that refused them, once per
    /// run of the same port.
    fn count_filtered(&mut self, table: &PortTable) {
        let count = |port: PortId, n: u64| {
            if let Some(e) = table.get(port) {
                e.stats.add_drop(DropReason::RxFilter, n);
            }
        };
        let mut run: Option<(PortId, u64)> = None;
        for p in self.filtered.drain(..) {
            run = match run {
                Some((q, n)) if q == p => Some((q, n + 1)),
                Some((q, n)) => {
                    count(q, n);
                    Some((p, 1))
                }
                None => Some((p, 1)),
            };
        }
        if let Some((q, n)) = run {
            count(q, n);
        }
    }

    fn apply_learning(&mut self, now: u64, in_entry: &PortEntry) {
        if self.learn.is_empty() {
            return;
        }
        use vmq_core::fdb::LearnOutcome;
        let stats = &in_entry.stats;
        // A port at its learning limit (a MAC flood) takes the write lock at most once per
        // interval, for the aging sweep to free places; its other requests are counted only.
        if now.saturating_sub(self.last_limited_learn) < LIMITED_LEARN_INTERVAL_NS {
            let before = self.learn.len();
            self.learn.retain(|r| !r.at_limit);
            stats.fdb_limit.fetch_add((before - self.learn.len()) as u64, Ordering::Relaxed);
            if self.learn.is_empty() {
                return;
            }
        } else if self.learn.iter().any(|r| r.at_limit) {
            self.last_limited_learn = now;
        }
        let mut sw = self.shared.switch_write();
        let held = Instant::now();
        for req in self.learn.drain(..) {
            let counter = match sw.learn(req, now) {
                LearnOutcome::Full => &stats.fdb_full,
                LearnOutcome::LimitReached => &stats.fdb_limit,
                LearnOutcome::Moved => &stats.fdb_moves,
                LearnOutcome::New | LearnOutcome::Refreshed | LearnOutcome::Static => continue,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        drop(sw);
        self.shared.worker_stats[self.index].learn_lock.record(held.elapsed());
    }

    /// Sends every decided delivery, one sink lock per destination (and lane) per batch.
    fn flush_deliveries(&mut self, in_entry: &PortEntry) {
        // Stable: frames of one flow keep their order.
        self.deliveries.sort_by_key(|d| d.port);
        let mut i = 0;
        while i < self.deliveries.len() {
            let port = self.deliveries[i].port;
            let mut j = i;
            while j < self.deliveries.len() && self.deliveries[j].port == port {
                j += 1;
            }
            // The switch may know a port this snapshot doesn't yet (just added): catch up.
            let generation = self.shared.table_generation.load(Ordering::Acquire);
            if self.table.get(port).is_none() && generation != self.seen_table {
                self.seen_table = generation;
                self.table = self.shared.worker_table();
            }
            let table = self.table.clone();
            let Some(entry) = table.get(port) else {
                // Removed meanwhile: the frames are dropped, and counted where they came in.
                in_entry.stats.add_drop(DropReason::PortDown, (j - i) as u64);
                i = j;
                continue;
            };
            if entry.sinks.count() == 1 {
                self.deliver_run(entry, 0, i..j);
            } else {
                self.deliver_to_lanes(entry, i..j);
            }
            i = j;
        }
        self.deliveries.clear();
    }

    /// A multiqueue port: each frame goes to the lane (guest RX queue) its flow picks among the
    /// live ones ([`crate::port::lane_pick`]), one lock per lane.
    fn deliver_to_lanes(&mut self, entry: &PortEntry, run: std::ops::Range<usize>) {
        entry.sinks.live_lanes(&mut self.live_lanes);
        if self.live_lanes.is_empty() {
            entry.stats.add_drop(DropReason::PortDown, run.len() as u64);
            return;
        }
        for d in &mut self.deliveries[run.clone()] {
            let frame = self.scratch.get(d.frame as usize).get(VnetHdr::LEN..).unwrap_or_default();
            d.lane = self.live_lanes[crate::port::lane_pick(frame, self.live_lanes.len())];
        }
        // Stable: a flow's frames keep their order within its lane.
        self.deliveries[run.clone()].sort_by_key(|d| d.lane);
        let mut i = run.start;
        while i < run.end {
            let lane = self.deliveries[i].lane;
            let mut j = i;
            while j < run.end && self.deliveries[j].lane == lane {
                j += 1;
            }
            self.deliver_run(entry, usize::from(lane), i..j);
            i = j;
        }
    }

    /// Delivers `deliveries[run]` to lane `lane` of `entry` in one batch of its sink.
    fn deliver_run(&mut self, entry: &PortEntry, lane: usize, run: std::ops::Range<usize>) {
        let Some(sink) = entry.sinks.lane(lane) else {
            entry.stats.add_drop(DropReason::PortDown, run.len() as u64);
            return;
        };
        let mut sink = lock(sink);
        let caps = sink.caps();
        // RSC/LRO toward receivers that take GSO frames (like GRO, on by default).
        let coalesce = caps.accepts_gso();
        let merged_before = self.coalescer.merged_segments();
        let worker_index = self.index;
        let Worker { scratch, hdrs, egress, coalescer, rsc_buf, deliveries, .. } = self;
        let out = OutPort { caps, spec: &entry.spec };
        let mut tally = EgressTally::default();
        sink.expect_frames(run.len());
        sink.batch(&mut |writer| {
            let mut send = |h: &VnetHdr, f: &[u8], tail: Option<&GuestTail>, edit: TagEdit| {
                if let Err(r) = deliver(writer, &out, h, f, tail, edit, egress, &mut tally) {
                    entry.stats.add_drop(r, 1);
                }
            };
            for d in &deliveries[run.clone()] {
                let raw = scratch.get(d.frame as usize);
                let tail = scratch.tail(d.frame as usize);
                let hdr = &hdrs[d.frame as usize];
                let frame = &raw[VnetHdr::LEN..];
                if coalesce && is_tcp_candidate(frame, hdr) {
                    apply_edit(frame, d.edit, rsc_buf);
                    if tail.is_some_and(|t| !t.append_to(rsc_buf)) {
                        entry.stats.add_drop(DropReason::BadDescriptor, 1);
                        continue;
                    }
                    coalescer.offer(hdr, rsc_buf, &mut |h, f| send(h, f, None, TagEdit::Keep));
                } else {
                    coalescer.flush(&mut |h, f| send(h, f, None, TagEdit::Keep));
                    send(hdr, frame, tail, d.edit);
                }
            }
            coalescer.flush(&mut |h, f| send(h, f, None, TagEdit::Keep));
            // Counted before the batch ends, so never later than the receiver sees it.
            let merged = coalescer.merged_segments() - merged_before;
            if merged != 0 {
                entry.stats.offload_coalesced.fetch_add(merged, Ordering::Relaxed);
            }
            tally.flush(&entry.stats, worker_index);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::udp_frame;
    use vmq_core::switch::SwitchConfig;
    use vmq_wire::MacAddr;

    #[test]
    fn frames_of_a_port_removed_mid_batch_are_counted_on_it() {
        // The worker's port table no longer has port 3 (removed), its task still runs once.
        let shared = Arc::new(Shared::new(Mode::Switch, Switch::new(SwitchConfig::default()), 1).unwrap());
        let mut worker = Worker::new(shared, 0).unwrap();
        let (guest, source, _sink) = crate::mem::mem_port(vmq_core::OffloadCaps::NONE, false);
        let frame = udp_frame(MacAddr([2, 0, 0, 0, 0, 2]), MacAddr([2, 0, 0, 0, 0, 1]), None, 100, 1);
        assert!(guest.send(&VnetHdr::default(), &frame));
        assert!(guest.send(&VnetHdr::default(), &frame));
        let stats = Arc::new(PortStats::default());
        let task = Task::new(TaskKind::PortTx { port: PortId(3) }, Box::new(source), stats.clone());
        assert_eq!(worker.run_task(&task), 2);
        let s = stats.snapshot();
        assert_eq!((s.rx_packets, s.drops(DropReason::PortDown), s.total_drops()), (2, 2, 2), "{s:?}");
    }
}

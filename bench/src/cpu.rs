//! CPU time by process, read from /proc (Linux): PostgreSQL, RabbitMQ, the system under test,
//! the bench itself and the whole machine, so a report can say what an order cost in CPU.
//!
//! The bench runs on the system's machine for this to mean anything (the numbers of processes
//! it cannot see are left out, never guessed). Processes are found by name at every snapshot:
//! `postgres` (or `postmaster`) for PostgreSQL, `beam.smp` for RabbitMQ, `orderflow` (except
//! the bench itself) for the system, unless `--system-pids` names the system's processes.
//! A process's time counts its own CPU and that of its children that exited, as /proc/PID/stat
//! reports them (utime + stime + cutime + cstime), so the time of a PostgreSQL backend that
//! ended during the run is found in its postmaster's. The machine's time is /proc/stat's `cpu`
//! line: busy is user + nice + system + irq + softirq, all is busy + idle + iowait (as
//! scripts/perf.sh counted it before).
//!
//! Context switches are counted beside the CPU: at low load an order's cost is mostly wake-ups
//! (a round trip wakes a thread in each of two processes), so switches per order say where the
//! fixed cost per hop goes. A group's switches are its threads' growth between the snapshots
//! (`voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of /proc/PID/task/TID/status; a
//! thread born in between counts all of its own); what a thread or process that ended in
//! between did since the first snapshot is lost (/proc shows no totals of ended threads of
//! other processes), so a group's figure is a lower bound. The machine's is /proc/stat's
//! `ctxt`: exact, and it also counts each switch to and from a core's idle task, so at low load
//! it is up to about twice the sum of the groups and not comparable with it.

use std::{collections::HashMap, fs};

use serde::Serialize;
use tokio::time::Instant;

/// The process groups whose CPU is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Postgres,
    Rabbitmq,
    System,
    Bench,
}

#[derive(Debug, Clone)]
struct Proc {
    group: Group,
    ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    /// Context switches of each live thread (by thread id), voluntary and not; `None` when its
    /// threads could not be read.
    switches: Option<HashMap<u32, u64>>,
}

/// CPU counters at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    /// (all, busy) ticks of the whole machine.
    machine: Option<(u64, u64)>,
    /// Context switches of the whole machine since boot.
    machine_switches: Option<u64>,
    procs: HashMap<u32, Proc>,
}

/// Reads the counters.
#[derive(Debug, Clone)]
pub struct Probe {
    ticks_per_s: f64,
    own_pid: u32,
    /// The system's pids as given; empty: every `orderflow` process but the bench.
    system_pids: Vec<u32>,
}

/// Where the CPU went between two snapshots, in core-milliseconds per order, and how often
/// threads were switched.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuReport {
    /// What the figures are divided by: "completed" (confirmed + cancelled) or "accepted"
    /// orders (when none completed, e.g. with no step workers running), "requests" or
    /// "baseline" orders.
    pub per: &'static str,
    pub orders: u64,
    pub seconds: f64,
    /// Core-milliseconds per order by process group; null when none of its processes was
    /// seen (e.g. the service runs on another machine).
    pub core_ms_per_order: ByGroup,
    /// Context switches per order by process group (a lower bound for a group; the machine's
    /// also counts the cores' idle task: see the module documentation), to one decimal.
    pub switches_per_order: ByGroup,
    /// How busy the machine's cores were over the interval, in percent.
    pub machine_busy_pct: Option<f64>,
    /// How many processes of each group were counted, and the system's pids.
    pub processes: Processes,
}

/// A figure for each process group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ByGroup {
    pub postgres: Option<f64>,
    pub rabbitmq: Option<f64>,
    /// The system under test: `orderflow` processes, or `--system-pids`.
    pub orderflow: Option<f64>,
    /// The bench's own process (everything in it: with the system in the same process, as in
    /// the tests, that too).
    pub bench: Option<f64>,
    /// The whole machine: all of the above and anything else running.
    pub machine: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Processes {
    pub postgres: usize,
    pub rabbitmq: usize,
    pub orderflow: Vec<u32>,
}

impl Probe {
    /// `None` when /proc cannot be read (not Linux, or hidden).
    pub fn new(system_pids: Vec<u32>) -> Option<Self> {
        machine_ticks()?;
        Some(Self {
            ticks_per_s: clock_ticks_per_s() as f64,
            own_pid: std::process::id(),
            system_pids,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut procs = HashMap::new();
        let pids = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
        for pid in pids {
            let Some((name, ppid, ticks)) = process(pid) else {
                continue;
            };
            let group = if pid == self.own_pid {
                Group::Bench
            } else if self.system_pids.contains(&pid) {
                Group::System
            } else {
                match name.as_str() {
                    "postgres" | "postmaster" => Group::Postgres,
                    "beam.smp" => Group::Rabbitmq,
                    "orderflow" if self.system_pids.is_empty() => Group::System,
                    _ => continue,
                }
            };
            let switches = switches(pid);
            procs.insert(
                pid,
                Proc {
                    group,
                    ppid,
                    ticks,
                    switches,
                },
            );
        }
        let stat = fs::read_to_string("/proc/stat").ok();
        Snapshot {
            at: Instant::now(),
            machine: stat.as_deref().and_then(parse_machine),
            machine_switches: stat.as_deref().and_then(parse_ctxt),
            procs,
        }
    }

    /// CPU per order between `before` and `after`.
    pub fn report(&self, before: &Snapshot, after: &Snapshot, orders: u64, per: &'static str) -> CpuReport {
        let per_order = |ticks: u64| {
            let ms = ticks as f64 * 1_000.0 / self.ticks_per_s / orders.max(1) as f64;
            (ms * 100.0).round() / 100.0
        };
        let group = |g: Group| group_ticks(before, after, g).map(per_order);
        let per_order_tenths = |n: u64| (n as f64 * 10.0 / orders.max(1) as f64).round() / 10.0;
        let switched = |g: Group| group_switches(before, after, g).map(per_order_tenths);
        let (machine, busy_pct) = match (before.machine, after.machine) {
            (Some((all0, busy0)), Some((all1, busy1))) => {
                let (all, busy) = (all1.saturating_sub(all0), busy1.saturating_sub(busy0));
                let pct = if all > 0 {
                    Some((busy as f64 * 1_000.0 / all as f64).round() / 10.0)
                } else {
                    None
                };
                (Some(per_order(busy)), pct)
            }
            _ => (None, None),
        };
        let mut system: Vec<u32> = after
            .procs
            .iter()
            .chain(&before.procs)
            .filter(|(_, p)| p.group == Group::System)
            .map(|(pid, _)| *pid)
            .collect();
        system.sort_unstable();
        system.dedup();
        let count = |g: Group| after.procs.values().filter(|p| p.group == g).count();
        CpuReport {
            per,
            orders,
            seconds: (after.at.saturating_duration_since(before.at).as_secs_f64() * 1_000.0).round() / 1_000.0,
            core_ms_per_order: ByGroup {
                postgres: group(Group::Postgres),
                rabbitmq: group(Group::Rabbitmq),
                orderflow: group(Group::System),
                bench: group(Group::Bench),
                machine,
            },
            switches_per_order: ByGroup {
                postgres: switched(Group::Postgres),
                rabbitmq: switched(Group::Rabbitmq),
                orderflow: switched(Group::System),
                bench: switched(Group::Bench),
                machine: before
                    .machine_switches
                    .zip(after.machine_switches)
                    .map(|(b, a)| per_order_tenths(a.saturating_sub(b))),
            },
            machine_busy_pct: busy_pct,
            processes: Processes {
                postgres: count(Group::Postgres),
                rabbitmq: count(Group::Rabbitmq),
                orderflow: system,
            },
        }
    }
}

/// A group's CPU ticks between two snapshots; `None` when it had no process in either.
///
/// A process that ended in between: if its parent is in the group, its whole time is now in
/// the parent's cutime/cstime (so what it had at `before` is subtracted, as for any process
/// of the group); if not, its time since `before` is lost, and it counts nothing rather than
/// a negative amount.
fn group_ticks(before: &Snapshot, after: &Snapshot, group: Group) -> Option<u64> {
    let in_group = |pid: &u32| {
        [before, after]
            .iter()
            .any(|s| s.procs.get(pid).is_some_and(|p| p.group == group))
    };
    let mut seen = false;
    let mut total: i64 = 0;
    for (pid, p) in after.procs.iter().filter(|(_, p)| p.group == group) {
        seen = true;
        let was = before
            .procs
            .get(pid)
            .filter(|b| b.group == group)
            .map_or(0, |b| b.ticks);
        total += p.ticks as i64 - was as i64;
    }
    for (pid, p) in before.procs.iter().filter(|(_, p)| p.group == group) {
        seen = true;
        if !after.procs.contains_key(pid) && in_group(&p.ppid) {
            total -= p.ticks as i64;
        }
    }
    seen.then(|| u64::try_from(total).unwrap_or(0))
}

/// A group's context switches between two snapshots: each thread's growth (a thread or process
/// that appeared in between counts all of its own; one that ended counts nothing); a process
/// whose threads could not be read in either snapshot counts nothing rather than a guess.
/// `None` when the group had no process in either.
fn group_switches(before: &Snapshot, after: &Snapshot, group: Group) -> Option<u64> {
    let seen = [before, after]
        .iter()
        .any(|s| s.procs.values().any(|p| p.group == group));
    let mut total = 0;
    for (pid, p) in after.procs.iter().filter(|(_, p)| p.group == group) {
        let Some(now) = &p.switches else { continue };
        let was = match before.procs.get(pid).filter(|b| b.group == group) {
            Some(Proc { switches: None, .. }) => continue,
            Some(b) => b.switches.as_ref(),
            None => None,
        };
        total += now
            .iter()
            .map(|(tid, n)| n.saturating_sub(was.and_then(|w| w.get(tid)).copied().unwrap_or(0)))
            .sum::<u64>();
    }
    seen.then_some(total)
}

/// The context switches of each live thread of process `pid`, by thread id; `None` when its
/// threads cannot be listed.
fn switches(pid: u32) -> Option<HashMap<u32, u64>> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|t| {
                let tid = t.file_name().to_str()?.parse().ok()?;
                let status = fs::read_to_string(t.path().join("status")).ok()?;
                Some((tid, parse_switches(&status)))
            })
            .collect(),
    )
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a /proc status file.
fn parse_switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            matches!(key, "voluntary_ctxt_switches" | "nonvoluntary_ctxt_switches")
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// The machine's context switches since boot: /proc/stat's `ctxt` line.
fn parse_ctxt(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("ctxt ")?.trim().parse().ok())
}

/// (name, ppid, utime + stime + cutime + cstime) of a process, from /proc/PID/stat.
fn process(pid: u32) -> Option<(String, u32, u64)> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<(String, u32, u64)> {
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; it ends at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields after the name, from 0: state, ppid (field 4 of proc(5)), ... utime (14) at 11.
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((name, ppid, ticks))
}

/// (all, busy) ticks of the whole machine from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    parse_machine(&fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(7)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq
    let [user, nice, system, idle, iowait, irq, softirq] = v.try_into().ok()?;
    let busy = user + nice + system + irq + softirq;
    Some((busy + idle + iowait, busy))
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), from the auxiliary vector the
/// kernel gave this process (AT_CLKTCK); 100, Linux's value everywhere, if unreadable.
fn clock_ticks_per_s() -> u64 {
    const AT_CLKTCK: usize = 17;
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| b.try_into().ok().map(usize::from_ne_bytes);
    fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| {
            auxv.chunks_exact(2 * WORD)
                .filter_map(|pair| Some((word(&pair[..WORD])?, word(&pair[WORD..])?)))
                .find(|(key, _)| *key == AT_CLKTCK)
                .map(|(_, v)| v as u64)
        })
        .filter(|hz| *hz > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("a (weird) name".to_owned(), 1, 310)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_machine_line_parses() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_machine(stat), Some((1_180, 160)));
        assert_eq!(parse_machine("intr 1 2 3"), None);
    }

    /// Processes as (pid, group, ppid, ticks), each with one thread (its pid) that has switched
    /// 10 times per tick.
    fn snap(procs: &[(u32, Group, u32, u64)], machine: (u64, u64)) -> Snapshot {
        let mut s = Snapshot {
            at: Instant::now(),
            machine: Some(machine),
            machine_switches: Some(machine.1 * 100),
            procs: HashMap::new(),
        };
        for &(pid, group, ppid, ticks) in procs {
            let threads = [(pid, ticks * 10)].into_iter().collect();
            s.procs.insert(
                pid,
                Proc {
                    group,
                    ppid,
                    ticks,
                    switches: Some(threads),
                },
            );
        }
        s
    }

    /// Replaces a process's threads in `s`: (tid, switches); `None`: unreadable.
    fn threads(s: &mut Snapshot, pid: u32, threads: Option<&[(u32, u64)]>) {
        s.procs.get_mut(&pid).unwrap().switches = threads.map(|t| t.iter().copied().collect());
    }

    #[test]
    fn ended_children_count_through_their_parent_and_orphans_never_go_negative() {
        let probe = Probe {
            ticks_per_s: 100.0,
            own_pid: 9,
            system_pids: vec![],
        };
        // Postmaster 10; backend 11 ends (its 30 ticks move to 10's cutime: 5 + 30 + 20 = 55
        // of which 20 ran in the new backend 12, also ended). System process 20 ends with no
        // parent in the group: it counts 0 rather than -40.
        let before = snap(
            &[
                (10, Group::Postgres, 1, 5),
                (11, Group::Postgres, 10, 10),
                (20, Group::System, 1, 40),
                (21, Group::System, 1, 0),
                (9, Group::Bench, 1, 3),
            ],
            (1_000, 400),
        );
        let after = snap(
            &[
                (10, Group::Postgres, 1, 5 + 30 + 20),
                (21, Group::System, 1, 50),
                (9, Group::Bench, 1, 13),
            ],
            (1_200, 500),
        );
        let r = probe.report(&before, &after, 10, "completed");
        // 40 ticks of PostgreSQL = 400 ms over 10 orders.
        assert_eq!(r.core_ms_per_order.postgres, Some(40.0));
        assert_eq!(r.core_ms_per_order.orderflow, Some(50.0));
        assert_eq!(r.core_ms_per_order.bench, Some(10.0));
        assert_eq!(r.core_ms_per_order.rabbitmq, None, "no beam.smp seen");
        assert_eq!(r.core_ms_per_order.machine, Some(100.0));
        assert_eq!(r.machine_busy_pct, Some(50.0));
        assert_eq!(r.processes.orderflow, vec![20, 21]);
        assert_eq!(r.processes.postgres, 1);
        // Switches of ended processes are lost: PostgreSQL's are the postmaster's growth
        // (500 over 10 orders), the system's only 21's (500).
        let s = &r.switches_per_order;
        assert_eq!((s.postgres, s.orderflow, s.bench), (Some(50.0), Some(50.0), Some(10.0)));
        assert_eq!(s.rabbitmq, None);
        assert_eq!(s.machine, Some(1_000.0), "100 busy ticks * 100 / 10 orders");
    }

    #[test]
    fn switches_are_each_threads_growth_so_an_ended_thread_hides_nothing_else() {
        let probe = Probe {
            ticks_per_s: 100.0,
            own_pid: 9,
            system_pids: vec![30, 31, 32],
        };
        let mut before = snap(&[(30, Group::System, 1, 0), (31, Group::System, 1, 0)], (0, 0));
        let mut after = snap(
            &[
                (30, Group::System, 1, 0),
                (31, Group::System, 1, 0),
                (32, Group::System, 1, 0),
            ],
            (0, 0),
        );
        // 30: thread 300 (5,000 switches in its life) ended, 301 grew by 40, 302 was born
        // with 7. 31 could not be read before: unknown, not counted. 32 is new: all of its 3.
        threads(&mut before, 30, Some(&[(300, 5_000), (301, 100)]));
        threads(&mut after, 30, Some(&[(301, 140), (302, 7)]));
        threads(&mut before, 31, None);
        threads(&mut after, 31, Some(&[(310, 1_000_000)]));
        threads(&mut after, 32, Some(&[(320, 3)]));
        let r = probe.report(&before, &after, 1, "completed");
        assert_eq!(r.switches_per_order.orderflow, Some(50.0));
    }

    #[test]
    fn switch_counters_parse() {
        let status = "Name:\tpostgres\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), 127);
        assert_eq!(parse_switches("Name:\tx\n"), 0);
        assert_eq!(parse_ctxt("cpu  1 2 3\nctxt 987654\nbtime 1\n"), Some(987_654));
        assert_eq!(parse_ctxt("cpu  1 2 3\n"), None);
    }

    #[test]
    fn this_machine_can_be_read() {
        let Some(probe) = Probe::new(vec![]) else {
            return; // not Linux
        };
        assert!(probe.ticks_per_s >= 1.0);
        let s = probe.snapshot();
        assert!(s.machine_switches.is_some_and(|n| n > 0), "the machine has switched");
        assert!(
            s.procs
                .get(&std::process::id())
                .and_then(|p| p.switches.as_ref())
                .is_some_and(|t| t.values().sum::<u64>() > 0),
            "the bench's threads have switched"
        );
        assert_eq!(
            s.procs.get(&std::process::id()).map(|p| p.group),
            Some(Group::Bench),
            "the bench finds itself"
        );
    }
}

//! Per-process resource attributes: who a span belongs to.
use std::{collections::HashMap, sync::Arc};

use crate::span::{KeyValue, Value};

/// Most processes whose resource is kept; beyond that, entries of exited processes are purged.
const MAX_PROCESSES: usize = 8192;

#[derive(Debug)]
pub struct Resource {
    pub service_name: String,
    pub attributes: Vec<KeyValue>,
}

pub struct ProcessCache {
    host_name: String,
    by_pid: HashMap<u32, (u64, Arc<Resource>)>,
}

/// The inode of process `pid`'s network namespace (`/proc/PID/ns/net`), while it lives.
pub fn netns_of(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The only environment variables of a traced process the agent reads.
const WANTED_ENV: [&str; 2] = ["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"];

/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` of process `pid`. The rest of its
/// environment (where secrets live) is scanned in place and never copied or kept.
fn wanted_env(pid: u32) -> [Option<String>; 2] {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    pick_env(&raw)
}

fn pick_env(raw: &[u8]) -> [Option<String>; 2] {
    let mut out = [None, None];
    for entry in raw.split(|b| *b == 0) {
        for (i, name) in WANTED_ENV.iter().enumerate() {
            if let Some(v) = entry
                .strip_prefix(name.as_bytes())
                .and_then(|r| r.strip_prefix(b"="))
            {
                out[i] = Some(String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    out
}

impl ProcessCache {
    pub fn new() -> Self {
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        ProcessCache {
            host_name,
            by_pid: HashMap::new(),
        }
    }

    /// The resource of `pid`, rebuilt when the pid now names another process (pid reuse).
    /// `comm` (from the kernel event) names the process if it already exited.
    pub fn resource(&mut self, pid: u32, comm: &[u8]) -> Arc<Resource> {
        let proc_ = procfs::process::Process::new(pid as i32).ok();
        let start = proc_
            .as_ref()
            .and_then(|p| p.stat().ok())
            .map(|s| s.starttime)
            .unwrap_or(0);
        if let Some((s, r)) = self.by_pid.get(&pid) {
            if *s == start {
                return r.clone();
            }
        }
        if self.by_pid.len() >= MAX_PROCESSES {
            self.by_pid
                .retain(|pid, _| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if self.by_pid.len() >= MAX_PROCESSES {
                self.by_pid.clear();
            }
        }
        let comm = String::from_utf8_lossy(comm.split(|b| *b == 0).next().unwrap_or_default())
            .into_owned();
        let r = Arc::new(self.build(pid, proc_.as_ref(), comm));
        self.by_pid.insert(pid, (start, r.clone()));
        r
    }

    fn build(&self, pid: u32, p: Option<&procfs::process::Process>, comm: String) -> Resource {
        let exe = p.and_then(|p| p.exe().ok());
        let exe_path = exe.as_ref().map(|e| e.to_string_lossy().into_owned());
        let exe_name = exe
            .as_ref()
            .and_then(|e| e.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| p.and_then(|p| p.stat().ok()).map(|s| s.comm))
            .or_else(|| (!comm.is_empty()).then_some(comm))
            .unwrap_or_else(|| format!("pid-{pid}"));
        let [service, extra] = wanted_env(pid);
        let env = |k: &str| match k {
            "OTEL_SERVICE_NAME" => service.clone(),
            _ => extra.clone(),
        };
        let service_name = env("OTEL_SERVICE_NAME")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| exe_name.clone());
        let mut attributes = vec![
            KeyValue::new("service.name", Value::Str(service_name.clone().into())),
            KeyValue::new("process.pid", Value::Int(pid as i64)),
            KeyValue::new("process.executable.name", Value::Str(exe_name.into())),
        ];
        if let Some(path) = exe_path {
            attributes.push(KeyValue::new(
                "process.executable.path",
                Value::Str(path.into()),
            ));
        }
        attributes.extend([
            KeyValue::new("host.name", Value::Str(self.host_name.clone().into())),
            KeyValue::new(
                "telemetry.sdk.name",
                Value::Str("beholder-ebpf-agent".into()),
            ),
            KeyValue::new("telemetry.sdk.language", Value::Str("rust".into())),
            KeyValue::new(
                "telemetry.sdk.version",
                Value::Str(env!("CARGO_PKG_VERSION").into()),
            ),
        ]);
        // The target's own OTEL_RESOURCE_ATTRIBUTES (key=value,...), where it does not clash.
        if let Some(extra) = env("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in extra.split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    let k = k.trim();
                    if !k.is_empty() && !attributes.iter().any(|a| a.key == k) {
                        attributes.push(KeyValue::owned(
                            k.to_owned(),
                            Value::Str(v.trim().to_owned().into()),
                        ));
                    }
                }
            }
        }
        Resource {
            service_name,
            attributes,
        }
    }
}

impl Default for ProcessCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_variables_are_taken() {
        let raw = b"PATH=/bin\0OTEL_SERVICE_NAME=shop\0DB_PASSWORD=hunter2\0OTEL_SERVICE_NAME_X=no\0OTEL_RESOURCE_ATTRIBUTES=a=b,c=d\0";
        let [svc, extra] = pick_env(raw);
        assert_eq!(svc.as_deref(), Some("shop"));
        assert_eq!(extra.as_deref(), Some("a=b,c=d"));
        assert_eq!(pick_env(b""), [None, None]);
    }
}

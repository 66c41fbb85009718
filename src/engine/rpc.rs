//! ggml's RPC backend: workers that serve their devices to other machines, and clients that add
//! those devices to their own.
//!
//! `llama-cpp-2` has no bindings for `ggml-rpc.h`; its two entry points are reached through the
//! RPC backend's registry (`ggml_backend_reg_get_proc_address`), as llama.cpp's own tools do.
//!
//! ggml aborts the process when a worker cannot be reached or answers with another protocol
//! version. So before ggml sees an endpoint, [`probe`] connects to it with a time limit and
//! performs the protocol's HELLO exchange itself, which turns those cases into errors that name
//! the worker (and both versions). The exchange is written by hand here because ggml offers no
//! call that reports instead of aborting; it is the first message of ggml-rpc's protocol:
//! `| cmd: u8 = 14 | size: u64 = 24 | conn_caps: [u8; 24] |`, answered by
//! `| size: u64 = 28 | major, minor, patch, pad: u8 | conn_caps: [u8; 24] |` (all little-endian).

use std::ffi::{c_char, CString};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{devices, take_log, Device, DeviceKind, Engine, EngineError};

/// The RPC protocol version of the vendored ggml (`RPC_PROTO_*_VERSION` in `ggml-rpc.h`).
pub const RPC_PROTOCOL: (u8, u8, u8) = (7, 0, 0);

const CMD_HELLO: u8 = 14;
const CONN_CAPS: usize = 24;

/// Endpoints added to this process, for naming the ones that died.
static WORKERS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The endpoint of each remote device (by its handle's address).
static DEVICE_ENDPOINTS: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());

/// The worker a device belongs to, if it is remote.
pub(crate) fn endpoint_of(dev: llama_cpp_sys_2::ggml_backend_dev_t) -> Option<String> {
    DEVICE_ENDPOINTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(d, _)| *d == dev as usize)
        .map(|(_, e)| e.clone())
}

/// What a worker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcProbe {
    /// `host:port`.
    pub endpoint: String,
    /// Its protocol version.
    pub version: (u8, u8, u8),
}

fn version(v: (u8, u8, u8)) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// Checks that `endpoint` is `host:port` as ggml reads it.
///
/// # Errors
/// Anything else, naming the endpoint.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), EngineError> {
    let bad = |why: &str| EngineError::Rpc {
        endpoint: endpoint.to_string(),
        why: why.to_string(),
    };
    let (host, port) = endpoint
        .split_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() || host.contains(['[', ']', ':']) {
        return Err(bad(
            "expected HOST:PORT with a host name or IPv4 address (ggml's RPC takes no IPv6)",
        ));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number between 1 and 65535"))?;
    if port == 0 {
        return Err(bad("the port is not a number between 1 and 65535"));
    }
    Ok((host.to_string(), port))
}

/// Connects to a worker and exchanges HELLO, within `timeout`.
///
/// # Errors
/// An endpoint that cannot be reached or does not answer in time, or another protocol version.
pub fn probe(endpoint: &str, timeout: Duration) -> Result<RpcProbe, EngineError> {
    let (host, port) = parse_endpoint(endpoint)?;
    let fail = |why: String| EngineError::Rpc {
        endpoint: endpoint.to_string(),
        why,
    };
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut s = stream.ok_or_else(|| {
        fail(format!(
            "cannot connect ({}); is `falcon-infer rpc-server` running there and reachable?",
            last.map_or_else(|| "no address".to_string(), |e| e.to_string())
        ))
    })?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    let mut req = Vec::with_capacity(1 + 8 + CONN_CAPS);
    req.push(CMD_HELLO);
    req.extend_from_slice(&(CONN_CAPS as u64).to_le_bytes());
    req.extend_from_slice(&[0u8; CONN_CAPS]);
    s.write_all(&req)
        .map_err(|e| fail(format!("the handshake failed: {e}")))?;
    let mut size = [0u8; 8];
    s.read_exact(&mut size).map_err(|e| {
        fail(format!(
            "no answer to the handshake ({e}): it may be busy with another client, or speak a \
             protocol other than this build's {}",
            version(RPC_PROTOCOL)
        ))
    })?;
    let size = u64::from_le_bytes(size);
    if !(4..=1024).contains(&size) {
        return Err(fail(format!(
            "answered the handshake with {size} bytes: not a ggml RPC worker of protocol {}",
            version(RPC_PROTOCOL)
        )));
    }
    let mut rsp = vec![0u8; size as usize];
    s.read_exact(&mut rsp)
        .map_err(|e| fail(format!("the handshake was cut off: {e}")))?;
    let theirs = (rsp[0], rsp[1], rsp[2]);
    // ggml's rule: the same major version, and a minor version no newer than ours.
    if theirs.0 != RPC_PROTOCOL.0 || theirs.1 > RPC_PROTOCOL.1 {
        return Err(EngineError::RpcVersion {
            endpoint: endpoint.to_string(),
            theirs: version(theirs),
            ours: version(RPC_PROTOCOL),
        });
    }
    Ok(RpcProbe {
        endpoint: endpoint.to_string(),
        version: theirs,
    })
}

/// The added workers that no longer accept connections.
pub(crate) fn unreachable_workers() -> Vec<String> {
    let workers = WORKERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    workers
        .into_iter()
        .filter(|w| {
            let Ok((host, port)) = parse_endpoint(w) else {
                return true;
            };
            let Ok(mut addrs) = (host.as_str(), port).to_socket_addrs() else {
                return true;
            };
            // A live worker busy with this process still accepts a connection into its backlog.
            !addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
        })
        .collect()
}

type AddServerFn = unsafe extern "C" fn(*const c_char) -> llama_cpp_sys_2::ggml_backend_reg_t;
type StartServerFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    usize,
    usize,
    *mut llama_cpp_sys_2::ggml_backend_dev_t,
);

fn rpc_proc(name: &str) -> Result<*mut std::ffi::c_void, EngineError> {
    let reg_name = CString::new("RPC").expect("no NUL");
    // SAFETY: a lookup in ggml's registry by a NUL-terminated name.
    let reg = unsafe { llama_cpp_sys_2::ggml_backend_reg_by_name(reg_name.as_ptr()) };
    if reg.is_null() {
        return Err(EngineError::NoRpc);
    }
    let cname = CString::new(name).expect("no NUL");
    // SAFETY: `reg` is the registered RPC backend; the name is NUL-terminated.
    let f = unsafe { llama_cpp_sys_2::ggml_backend_reg_get_proc_address(reg, cname.as_ptr()) };
    if f.is_null() {
        return Err(EngineError::NoRpc);
    }
    Ok(f)
}

/// What an RPC worker serves.
#[derive(Debug, Clone)]
pub struct RpcServerOptions {
    /// `host:port` to listen on.
    pub endpoint: String,
    /// CPU threads of the CPU backend.
    pub threads: usize,
    /// Device names to serve (`None`: every GPU, or the CPU when there is none).
    pub devices: Option<Vec<String>>,
    /// A directory where the worker caches large tensors by hash, so that a client that loads
    /// the same model again sends hashes instead of the weights.
    pub cache_dir: Option<PathBuf>,
}

impl Engine {
    /// Whether this build has the RPC backend.
    #[must_use]
    pub fn has_rpc(&self) -> bool {
        rpc_proc("ggml_backend_rpc_add_server").is_ok()
    }

    /// Adds RPC workers: each is probed within `timeout`, then its devices join this process's
    /// (after the local ones, in the order given).
    ///
    /// # Errors
    /// A build without RPC, a worker that cannot be reached or speaks another version.
    pub fn add_rpc_workers(
        &self,
        endpoints: &[String],
        timeout: Duration,
    ) -> Result<Vec<Device>, EngineError> {
        let add = rpc_proc("ggml_backend_rpc_add_server")?;
        // Probe them all first, so that nothing is registered when one is wrong.
        for e in endpoints {
            probe(e, timeout)?;
        }
        // SAFETY: the RPC registry returns this function for this name; its signature is
        // `ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)`.
        let add: AddServerFn =
            unsafe { std::mem::transmute::<*mut std::ffi::c_void, AddServerFn>(add) };
        let before = devices().len();
        for e in endpoints {
            let c = CString::new(e.as_str()).map_err(|_| EngineError::Rpc {
                endpoint: e.clone(),
                why: "contains a NUL byte".into(),
            })?;
            WORKERS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.clone());
            take_log();
            // SAFETY: `c` is NUL-terminated; the worker answered our HELLO just now, so ggml's
            // own connection and handshake are expected to succeed (if it died in between, ggml
            // aborts through the handler installed with `on_fatal`).
            let reg = unsafe { add(c.as_ptr()) };
            if reg.is_null() {
                return Err(EngineError::Rpc {
                    endpoint: e.clone(),
                    why: format!("ggml could not add it{}", super::detail(&take_log())),
                });
            }
            // SAFETY: `reg` is the registry ggml made for this worker; registering it makes its
            // devices part of the device list llama.cpp places layers on.
            unsafe { llama_cpp_sys_2::ggml_backend_register(reg) };
            // SAFETY: plain queries of the registry just registered.
            let n = unsafe { llama_cpp_sys_2::ggml_backend_reg_dev_count(reg) };
            for i in 0..n {
                // SAFETY: `i` is below the registry's device count.
                let dev = unsafe { llama_cpp_sys_2::ggml_backend_reg_dev_get(reg, i) };
                DEVICE_ENDPOINTS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((dev as usize, e.clone()));
            }
        }
        Ok(devices()
            .into_iter()
            .skip(before)
            .filter(|d| d.kind == DeviceKind::Remote)
            .collect())
    }

    /// Serves this machine's devices to RPC clients. Blocks for as long as the worker runs.
    ///
    /// # Errors
    /// A build without RPC, an unknown device name, or a worker that could not start (the
    /// address is taken, say).
    pub fn serve_rpc(&self, opts: &RpcServerOptions) -> Result<(), EngineError> {
        parse_endpoint(&opts.endpoint)?;
        let start = rpc_proc("ggml_backend_rpc_start_server")?;
        let all = devices();
        let chosen: Vec<&Device> = match &opts.devices {
            Some(names) => names
                .iter()
                .map(|n| {
                    all.iter()
                        .find(|d| d.name.eq_ignore_ascii_case(n))
                        .ok_or_else(|| EngineError::Rpc {
                            endpoint: opts.endpoint.clone(),
                            why: format!(
                                "no device named {n}; devices here: {}",
                                all.iter()
                                    .map(|d| d.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        })
                })
                .collect::<Result<_, _>>()?,
            None => {
                let gpus: Vec<&Device> = all.iter().filter(|d| d.kind == DeviceKind::Gpu).collect();
                if gpus.is_empty() {
                    all.iter().filter(|d| d.kind == DeviceKind::Cpu).collect()
                } else {
                    gpus
                }
            }
        };
        let mut handles: Vec<llama_cpp_sys_2::ggml_backend_dev_t> = chosen
            .iter()
            // SAFETY: the index comes from the device list.
            .map(|d| unsafe { llama_cpp_sys_2::ggml_backend_dev_get(d.index) })
            .collect();
        let endpoint = CString::new(opts.endpoint.as_str()).expect("checked by parse_endpoint");
        let cache = opts
            .cache_dir
            .as_ref()
            .map(|p| {
                p.to_str()
                    .and_then(|s| CString::new(s).ok())
                    .ok_or_else(|| EngineError::Path(p.clone()))
            })
            .transpose()?;
        // SAFETY: the registry returns this function for this name, with the signature of
        // `ggml_backend_rpc_start_server` in ggml-rpc.h.
        let start: StartServerFn =
            unsafe { std::mem::transmute::<*mut std::ffi::c_void, StartServerFn>(start) };
        take_log();
        // SAFETY: the strings are NUL-terminated and the device array holds `handles.len()`
        // registered devices; all outlive the call, which only returns when the server stops.
        unsafe {
            start(
                endpoint.as_ptr(),
                cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                opts.threads.max(1),
                handles.len(),
                handles.as_mut_ptr(),
            );
        }
        Err(EngineError::Rpc {
            endpoint: opts.endpoint.clone(),
            why: format!(
                "the worker stopped: the address may be in use or not local{}",
                super::detail(&take_log())
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(
            parse_endpoint("10.0.0.2:50052").unwrap(),
            ("10.0.0.2".into(), 50052)
        );
        for bad in [
            "10.0.0.2",
            ":50052",
            "host:port",
            "[::1]:50052",
            "h:0",
            "h:70000",
        ] {
            let e = parse_endpoint(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("RPC worker {bad}: ")), "{e}");
        }
    }

    /// A worker that answers HELLO with the given version.
    fn fake_worker(v: (u8, u8, u8)) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 1 + 8 + CONN_CAPS];
            s.read_exact(&mut req).unwrap();
            assert_eq!(req[0], CMD_HELLO);
            let mut rsp = (28u64).to_le_bytes().to_vec();
            rsp.extend_from_slice(&[v.0, v.1, v.2, 0]);
            rsp.extend_from_slice(&[0u8; CONN_CAPS]);
            s.write_all(&rsp).unwrap();
        });
        addr
    }

    #[test]
    fn a_worker_of_another_version_is_refused_naming_both() {
        let addr = fake_worker((RPC_PROTOCOL.0 + 1, 0, 0));
        let e = probe(&addr, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "RPC worker {addr} speaks protocol {}.0.0, this build speaks {}",
                RPC_PROTOCOL.0 + 1,
                version(RPC_PROTOCOL)
            )
        );
        let addr = fake_worker(RPC_PROTOCOL);
        assert_eq!(
            probe(&addr, Duration::from_secs(5)).unwrap().version,
            RPC_PROTOCOL
        );
    }

    #[test]
    fn an_unreachable_worker_is_an_error_within_the_time_limit() {
        // A port nobody listens on: bind, note it, close.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = std::time::Instant::now();
        let e = probe(&format!("127.0.0.1:{port}"), Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(e.contains("cannot connect"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_silent_listener_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::time::Instant::now();
        let e = probe(&addr, Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer to the handshake"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(l);
    }
}

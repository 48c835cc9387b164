//! A role that misbehaves on request, to prove the host survives it.
//!
//! Commands: `ok`, `loop` (never returns), `hog` (allocates without bound),
//! `trap` (executes `unreachable`), `panic`, `huge` (a 10 MB response),
//! `sleep MS` (waits in WASI's clock).
//! Its `[config] init` picks how `init` behaves: `ok` (default), `fail`
//! (returns an error), `trap`, `loop`, or `slow` (sleeps `init_ms`).

use hivemind_sdk::{Description, Request, Response, Role, export_role, host};

struct Misbehave;

#[derive(serde::Deserialize, Default)]
struct Config {
    #[serde(default)]
    init: String,
    #[serde(default)]
    init_ms: u64,
}

impl Role for Misbehave {
    fn describe() -> Description {
        Description::new("misbehave", env!("CARGO_PKG_VERSION"))
    }

    fn init() -> Result<(), String> {
        let config: Config = host::config().unwrap_or_default();
        match config.init.as_str() {
            "fail" => Err("init refused on purpose (config init = \"fail\")".into()),
            "trap" => trap(),
            "loop" => spin_forever(),
            "slow" => {
                std::thread::sleep(std::time::Duration::from_millis(config.init_ms));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_request(request: Request) -> Response {
        match request.command() {
            "ok" => Response::text(200, "ok"),
            "loop" => spin_forever(),
            "hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "leak" => {
                // One MiB kept for good each call, as a heap that never
                // shrinks would: the answer is what this instance holds.
                static LEAKED_MIB: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                std::hint::black_box(Box::leak(vec![1u8; 1 << 20].into_boxed_slice()));
                let held = LEAKED_MIB.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Response::text(200, &held.to_string())
            }
            "sleep" => {
                let ms = request.args().first().and_then(|ms| ms.parse().ok()).unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Response::text(200, "slept")
            }
            "trap" => trap(),
            "panic" => panic!("misbehave panicked on purpose"),
            "huge" => Response {
                status: 200,
                headers: vec![],
                body: vec![b'x'; 10 << 20],
            },
            _ => Response::not_found(&request),
        }
    }
}

fn spin_forever() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    unreachable!("misbehave traps only as WebAssembly")
}

export_role!(Misbehave);

//! Real TCP backends for bridge tests, and client sessions through a
//! bridge.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{PATIENCE, free_port};

/// What a test backend does with a client.
#[derive(Clone, Copy, PartialEq)]
pub enum Manner {
    /// Sends its name and a newline, then echoes every line back.
    Greet,
    /// Accepts and reads, never answers.
    Silent,
}

/// A real TCP backend on a fixed loopback port that the test can stop
/// (listener and every connection closed) and start again.
pub struct Backend {
    name: &'static str,
    port: u16,
    manner: Manner,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: JoinHandle<()>,
}

impl Backend {
    pub fn start(name: &'static str, manner: Manner) -> Backend {
        let mut backend = Backend {
            name,
            port: free_port(),
            manner,
            running: None,
        };
        backend.resume();
        backend
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn resume(&mut self) {
        assert!(self.running.is_none());
        let listener = TcpListener::bind(self.address()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Default::default();
        let (name, manner) = (self.name, self.manner);
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            connections.lock().unwrap().push(stream.try_clone().unwrap());
                            std::thread::spawn(move || serve(stream, name, manner));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        self.running = Some(Running {
            stop,
            connections,
            acceptor,
        });
    }

    /// Closes the listener and resets every connection: a crashed backend.
    pub fn kill(&mut self) {
        let running = self.running.take().expect("running");
        running.stop.store(true, Ordering::Relaxed);
        running.acceptor.join().unwrap();
        for connection in running.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.running.is_some() {
            self.kill();
        }
    }
}

fn serve(stream: TcpStream, name: &str, manner: Manner) {
    let control = stream.try_clone().unwrap();
    converse(stream, name, manner);
    // The backend keeps a clone of every connection (to kill it), so the
    // end of a conversation closes the connection explicitly.
    let _ = control.shutdown(std::net::Shutdown::Both);
}

fn converse(stream: TcpStream, name: &str, manner: Manner) {
    let mut writer = stream.try_clone().unwrap();
    if manner == Manner::Greet && writeln!(writer, "{name}").is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(read) if read > 0) {
        if manner == Manner::Greet && writer.write_all(line.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

/// A client session through a bridge.
pub struct Session {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Session {
    /// Connects to a bridge port and reads the backend's greeting; `None`
    /// when the bridge closed the connection without one.
    pub fn open(port: u16) -> Option<(Session, String)> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut session = Session {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        };
        let greeting = session.line()?;
        Some((session, greeting))
    }

    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(read) if read > 0 => Some(line.trim_end().to_string()),
            _ => None,
        }
    }

    /// Sends a line and expects it back.
    pub fn echoes(&mut self, text: &str) -> bool {
        writeln!(self.writer, "{text}").is_ok() && self.line().as_deref() == Some(text)
    }

    /// Waits until the bridge ends the session (EOF or reset).
    pub fn wait_closed(&mut self, what: &str) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        let mut buffer = [0u8; 256];
        loop {
            match self.reader.read(&mut buffer) {
                Ok(0) => return,
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            assert!(Instant::now() < deadline, "{what}: the session was not severed");
        }
    }
}

/// A `[[bridge]]` section with `backends` in order.
pub fn bridge_section(name: &str, port: u16, extra: &str, backends: &[(&Backend, &str)]) -> String {
    let mut text = format!("[[bridge]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\n");
    for (backend, check) in backends {
        text += &format!(
            "[[bridge.backends]]\nname = \"{}\"\naddress = \"{}\"\n{check}\n",
            backend.name,
            backend.address()
        );
    }
    text
}

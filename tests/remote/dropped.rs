//! A connection that drops while a client waits for its job is retried, and nothing is relayed twice.

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A TCP proxy to `target` that cuts the first event stream it sees a few bytes into its events.
fn cutting_proxy(target: std::net::SocketAddr) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(target).unwrap();
            let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
            });
            let (mut s_read, mut c_write) = (server, client);
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    let n = match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen);
                    if !flag.load(Ordering::SeqCst) {
                        if let Some(at) = text.find("event: log") {
                            // Forward up to just inside the first log event, then drop the connection.
                            flag.store(true, Ordering::SeqCst);
                            let upto = (at + 8).saturating_sub(seen.len() - n).min(n);
                            let _ = c_write.write_all(&buf[..upto]);
                            let _ = c_write.shutdown(std::net::Shutdown::Both);
                            let _ = s_read.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                    if c_write.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, cut)
}

#[test]
fn a_dropped_event_stream_is_followed_again_without_repeats() -> nnsight::Result<()> {
    let target: std::net::SocketAddr = server().trim_start_matches("http://").parse().unwrap();
    let (url, cut) = cutting_proxy(target);
    let model = local();
    let r = Remote::new(url, "tiny").key(KEY);
    let (out, lines) = nnsight::interleave::capture_logs(|| -> nnsight::Result<Tensor> {
        intervene!(model.trace("Hello world").remote(&r) {
            log!(model.transformer.h[0].output.norm());
            log!(model.transformer.h[1].output.norm());
            let out = model.lm_head.output.save();
        });
        Ok(out)
    });
    assert!(cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy cut a stream");
    assert!(out?.equal(&model.forward("Hello world")?));
    assert_eq!(lines.len(), 2, "each line once: {lines:?}");
    Ok(())
}

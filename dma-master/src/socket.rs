// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The master's end of the socket: frames out and in, with deadlines, on a non-blocking
//! stream (a fault report must never block a DMA thread), plus the thread that notices the
//! daemon hanging up.

use std::{
    fs::File,
    io::{self, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::{EventFd, EFD_NONBLOCK},
    sock_ctrl_msg::ScmSocket,
};

use crate::wire::{self, HEADER, MAX_PAYLOAD};

/// A non-blocking stream with blocking-with-deadline helpers.
#[derive(Debug)]
pub(crate) struct Socket {
    stream: UnixStream,
    readable: Epoll,
    writable: Epoll,
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the daemon did not answer in time")
}

impl Socket {
    pub(crate) fn new(stream: UnixStream) -> io::Result<Socket> {
        stream.set_nonblocking(true)?;
        let readable = Epoll::new()?;
        readable.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, 0),
        )?;
        let writable = Epoll::new()?;
        writable.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::OUT, 0),
        )?;
        Ok(Socket {
            stream,
            readable,
            writable,
        })
    }

    pub(crate) fn try_clone(&self) -> io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Waits until `epoll` reports the socket ready, or the deadline passes.
    fn wait(epoll: &Epoll, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut events = [EpollEvent::default()];
        match epoll.wait(ms, &mut events) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes all of `bytes`, waiting (until `deadline`) while the socket is full.
    pub(crate) fn send_all(&self, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
        while !bytes.is_empty() {
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    Self::wait(&self.writable, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes `bytes` unless the socket is full: false when nothing was written. Once part of
    /// the frame is out, the rest follows (waiting until `deadline`), so frames never tear.
    pub(crate) fn try_send(&self, bytes: &[u8], deadline: Instant) -> io::Result<bool> {
        loop {
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.send_all(&bytes[n..], deadline)?;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills `buf`, keeping the file a chunk came with (at most one per frame is expected).
    fn recv_exact(
        &self,
        buf: &mut [u8],
        file: &mut Option<File>,
        deadline: Instant,
    ) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            match self.stream.recv_with_fd(&mut buf[at..]) {
                Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok((n, received)) => {
                    at += n;
                    if received.is_some() {
                        // A second file in one frame is a protocol error; the first is kept.
                        if file.is_some() {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "two files in one frame",
                            ));
                        }
                        *file = received;
                    }
                }
                Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EWOULDBLOCK => {
                    Self::wait(&self.readable, deadline)?
                }
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
        Ok(())
    }

    /// Reads one frame: its kind, payload and the file that came with it, if any.
    pub(crate) fn recv_frame(&self, deadline: Instant) -> io::Result<(u16, Vec<u8>, Option<File>)> {
        let mut header = [0u8; HEADER];
        let mut file = None;
        self.recv_exact(&mut header, &mut file, deadline)?;
        let (kind, len) = wire::parse_header(&header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        debug_assert!(len <= MAX_PAYLOAD);
        let mut payload = vec![0u8; len];
        self.recv_exact(&mut payload, &mut file, deadline)?;
        Ok((kind, payload, file))
    }
}

/// Watches the socket for the daemon hanging up (it also does so when it cuts the master
/// off): sets `closed`, so that no section starts any more. Stops when `stop` is signalled.
pub(crate) fn watch(stream: UnixStream, closed: Arc<AtomicBool>) -> io::Result<EventFd> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let stop_here = stop.try_clone()?;
    let epoll = Epoll::new()?;
    // Not IN: replies are read by requests; only a hang-up (or an error) wakes this thread.
    epoll.ctl(
        ControlOperation::Add,
        stream.as_raw_fd(),
        EpollEvent::new(EventSet::READ_HANG_UP, 1),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop_here.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 2),
    )?;
    std::thread::Builder::new()
        .name("iommu-master-watch".into())
        .spawn(move || {
            // Both stay open until this thread ends: closing a registered file takes it out of
            // the epoll set, also between the stop signal and this thread seeing it.
            let (_stream, _stop) = (stream, stop_here);
            let mut events = [EpollEvent::default(); 2];
            loop {
                match epoll.wait(-1, &mut events) {
                    Ok(n) => {
                        if events[..n].iter().any(|e| e.data() == 2) {
                            return;
                        }
                        if n > 0 {
                            closed.store(true, Ordering::SeqCst);
                            log::warn!(
                                "the IOMMU daemon hung up: translations are refused from now on"
                            );
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        closed.store(true, Ordering::SeqCst);
                        log::warn!("watching the IOMMU daemon's socket: {e}");
                        return;
                    }
                }
            }
        })?;
    Ok(stop)
}

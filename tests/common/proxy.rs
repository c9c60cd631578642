//! A TCP proxy a test puts in front of a server to fail the link as networks do:
//! [`cut`](Proxy::cut) resets every connection it carries (RST both ways), as a failing link
//! or a restarted load balancer would; [`freeze`](Proxy::freeze) stops every byte both ways
//! and keeps the connections open, new ones included, as a host that lost its power or its
//! network does: nothing answers and nothing closes.

#![allow(dead_code)]

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub port: u16,
    live: AtomicUsize,
    cut: Mutex<CancellationToken>,
    frozen: CancellationToken,
    /// The local ports of its connections to the target (how the target names its clients).
    outbound: Mutex<HashSet<u16>>,
}

impl Proxy {
    /// A proxy on a free local port, forwarding to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Self {
            port: listener.local_addr().unwrap().port(),
            live: AtomicUsize::new(0),
            cut: Default::default(),
            frozen: CancellationToken::new(),
            outbound: Default::default(),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (p, cut) = (p.clone(), p.cut.lock().unwrap().clone());
                tokio::spawn(async move {
                    if p.frozen.is_cancelled() {
                        cut.cancelled().await;
                        let _ = inbound.set_zero_linger();
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    if let Ok(local) = outbound.local_addr() {
                        p.outbound.lock().unwrap().insert(local.port());
                    }
                    p.live.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                        _ = p.frozen.cancelled() => {
                            // Held open, silent, until cut.
                            cut.cancelled().await;
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                    }
                    p.live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        proxy
    }

    /// Connections it carries now.
    pub fn connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// The client ports the target has seen from this proxy: to end the target's side of
    /// frozen connections (its sessions, their locks) as a server that died would.
    pub fn outbound_ports(&self) -> Vec<i32> {
        self.outbound.lock().unwrap().iter().map(|&p| i32::from(p)).collect()
    }

    /// Resets every connection open now (frozen ones too); returns how many it carried.
    pub fn cut(&self) -> usize {
        let live = self.connections();
        std::mem::take(&mut *self.cut.lock().unwrap()).cancel();
        live
    }

    /// From now on nothing passes either way, on the connections open now and on new ones,
    /// and none is closed until [`cut`](Self::cut).
    pub fn freeze(&self) {
        self.frozen.cancel();
    }
}

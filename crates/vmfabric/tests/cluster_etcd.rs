//! Cluster-wide address claims against a real etcd (Debian's etcd-server, started here
//! on loopback ports of its own): a claim is won once, held on renewal, refused to
//! another MAC; two "hosts" (two clients) racing many claims for one address give it
//! to exactly one; a release by a non-holder does nothing; with etcd gone a claim
//! fails (closed) instead of guessing; over TLS, only nodes with a certificate are
//! served. Needs the `etcd` binary (and openssl).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

mod harness;

use fabric::Mac;
use vmfabric::cluster::{Claim, ClusterStore, ClusterTls};

/// A claim's end well after the test.
fn later() -> u64 {
    now() + 600
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mac(n: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 0x0e, n])
}

#[test]
fn addresses_are_claimed_once_across_hosts_and_never_on_a_guess() {
    let dir = std::env::temp_dir().join(format!("vmf-etcd-{}", std::process::id()));
    let etcd = testkit::Etcd::start("127.0.0.1", dir);
    if !testkit::ready_or_skip(etcd.is_some(), "needs etcd (apt-get install etcd-server)") {
        return;
    }
    let mut etcd = etcd.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoints = etcd.endpoints.clone();
    let connect = |node: &'static str| {
        let endpoints = endpoints.clone();
        rt.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match ClusterStore::connect(&endpoints, "/vmfabric/test", node, Duration::from_secs(2), None).await {
                    // A first request proves the member is serving, not only listening.
                    Ok(s) => match s.release_address("probe", Ipv4Addr::UNSPECIFIED, mac(0)).await {
                        Ok(_) => return s,
                        Err(e) => assert!(Instant::now() < deadline, "etcd never served: {e}"),
                    },
                    Err(e) => assert!(Instant::now() < deadline, "etcd never came up: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let (host_a, host_b) = (connect("a"), connect("b"));
    let ip = Ipv4Addr::new(10, 0, 0, 5);
    rt.block_on(async {
        assert_eq!(
            host_a.claim_address("n", ip, mac(1), later(), None).await.unwrap(),
            Claim::Won
        );
        assert_eq!(
            host_a.claim_address("n", ip, mac(1), later(), None).await.unwrap(),
            Claim::Held
        );
        assert_eq!(
            host_b.claim_address("n", ip, mac(1), later(), None).await.unwrap(),
            Claim::Held,
            "the same guest on another host"
        );
        assert_eq!(
            host_b.claim_address("n", ip, mac(2), later(), None).await.unwrap(),
            Claim::TakenBy(mac(1))
        );
        // Another network's address of the same number is another key.
        assert_eq!(
            host_b.claim_address("m", ip, mac(2), later(), None).await.unwrap(),
            Claim::Won
        );
        assert!(
            !host_b.release_address("n", ip, mac(2)).await.unwrap(),
            "not the holder's to release"
        );
        assert!(host_a.release_address("n", ip, mac(1)).await.unwrap());
        assert_eq!(
            host_b.claim_address("n", ip, mac(2), later(), None).await.unwrap(),
            Claim::Won,
            "free again"
        );
        // A claim whose time ran out (an offer never taken, a lease not renewed) is
        // any node's to take over; one still running is not.
        let other = Ipv4Addr::new(10, 0, 0, 6);
        assert_eq!(
            host_a.claim_address("n", other, mac(4), now() - 1, None).await.unwrap(),
            Claim::Won
        );
        assert_eq!(
            host_b.claim_address("n", other, mac(5), later(), None).await.unwrap(),
            Claim::Won
        );
        assert_eq!(
            host_a.claim_address("n", other, mac(4), later(), None).await.unwrap(),
            Claim::TakenBy(mac(5))
        );
        // What a new port must not take: the network's held addresses, from any node.
        assert_eq!(
            host_b.held_addresses("n").await.unwrap(),
            HashSet::from([ip, other]),
            "the network's own, not network m's"
        );
        assert_eq!(host_a.held_addresses("m").await.unwrap(), HashSet::from([ip]));
        assert!(host_a.held_addresses("none").await.unwrap().is_empty());
        // The view shows who holds what, from which node.
        let view = host_a.view().await.unwrap();
        assert!(view.networks.is_empty(), "no network was created, only claims");
    });

    // The race: both hosts, 40 guests each, one remaining address, all at once.
    let last = Ipv4Addr::new(10, 0, 0, 250);
    let won = rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..80u8 {
            let host = if n % 2 == 0 { host_a.clone() } else { host_b.clone() };
            tasks.push(tokio::spawn(async move {
                (n, host.claim_address("n", last, mac(100 + n), later(), None).await)
            }));
        }
        let mut won = Vec::new();
        let mut holders = Vec::new();
        for t in tasks {
            let (n, claim) = t.await.unwrap();
            match claim.unwrap() {
                Claim::Won => won.push(n),
                Claim::TakenBy(m) => holders.push(m),
                Claim::Held => panic!("guest {n} cannot hold it already"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one winner: {won:?}");
        assert!(
            holders.iter().all(|m| *m == mac(100 + won[0])),
            "every loser told the winner"
        );
        won[0]
    });
    assert!(won < 80);

    // etcd gone: a claim fails, it does not guess.
    etcd.stop();
    let refused = rt.block_on(host_a.claim_address("n", Ipv4Addr::new(10, 0, 0, 7), mac(3), later(), None));
    assert!(refused.is_err(), "{refused:?}");
}

/// etcd speaking TLS and asking clients for certificates: a node with the CA and its
/// certificate claims addresses; without its certificate, or without TLS, it is
/// refused; a daemon given `--cluster-ca/--cluster-cert/--cluster-key` joins and
/// publishes a cluster network there.
#[test]
fn etcd_over_tls_serves_only_nodes_with_a_certificate() {
    let dir = std::env::temp_dir().join(format!("vmf-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = testkit::EtcdPki::make(&dir.join("pki"), "127.0.0.1");
    let etcd = testkit::Etcd::start_tls("127.0.0.1", dir.join("etcd"), &pki);
    if !testkit::ready_or_skip(etcd.is_some(), "needs etcd (apt-get install etcd-server)") {
        return;
    }
    let etcd = etcd.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let claim = |tls: Option<&ClusterTls>| {
        rt.block_on(async {
            let store =
                ClusterStore::connect(&etcd.endpoints, "/vmfabric/tls", "a", Duration::from_secs(3), tls).await?;
            store
                .claim_address("n", Ipv4Addr::new(10, 0, 0, 9), mac(9), later(), None)
                .await
        })
    };
    let with_cert = ClusterTls::load(&pki.ca, Some(&pki.client_cert), Some(&pki.client_key)).unwrap();
    assert_eq!(claim(Some(&with_cert)).unwrap(), Claim::Won);
    let without_cert = ClusterTls::load(&pki.ca, None, None).unwrap();
    assert!(
        claim(Some(&without_cert)).is_err(),
        "etcd took a node without a certificate"
    );
    assert!(claim(None).is_err(), "etcd took a node without TLS");

    // A daemon with the flags: its cluster network is in etcd.
    let daemon_dir = dir.join("daemon");
    std::fs::create_dir_all(&daemon_dir).unwrap();
    let vxlan_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let args = [
        "--cluster-endpoints",
        &etcd.endpoint_list(),
        "--cluster-prefix",
        "/vmfabric/tls",
        "--node",
        "d",
        "--underlay",
        "127.0.0.1",
        "--vxlan-port",
        &vxlan_port,
        "--cluster-ca",
        pki.ca.to_str().unwrap(),
        "--cluster-cert",
        pki.client_cert.to_str().unwrap(),
        "--cluster-key",
        pki.client_key.to_str().unwrap(),
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let daemon = harness::Process::start_in(None, &daemon_dir, &daemon_dir, &args);
    daemon.ok(
        "POST",
        "/v1/networks",
        Some(serde_json::json!({"name": "secure", "subnet": "10.69.0.0/24", "mtu": 1450, "scope": "cluster"})),
    );
    let view = rt.block_on(async {
        let store = ClusterStore::connect(
            &etcd.endpoints,
            "/vmfabric/tls",
            "t",
            Duration::from_secs(3),
            Some(&with_cert),
        )
        .await
        .unwrap();
        store.view().await.unwrap()
    });
    assert!(
        view.networks.contains_key("secure") && view.nodes.contains_key("d"),
        "{:?}",
        view.nodes
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

//! Bridges and TAP devices through netlink, inside a network namespace the test makes:
//! created, adopted when asked again (nothing duplicated, also from a new connection as
//! after a crash), stale vmfabric devices removed, devices of others never touched.
//! Needs root and /dev/net/tun.

use std::collections::HashSet;
use std::os::fd::AsFd;

use hostnet::{HostnetError, Links, TapOptions};
use testkit::Netns;

fn ip(args: &[&str]) -> String {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    testkit::run(&all)
}

#[test]
fn bridges_and_taps_are_made_adopted_and_cleaned_without_touching_others() {
    let ready = testkit::is_root() && std::path::Path::new("/dev/net/tun").exists();
    if !testkit::ready_or_skip(ready, "needs root and /dev/net/tun") {
        return;
    }
    let ns = Netns(format!("hn{}", std::process::id() % 100_000));
    ip(&["netns", "add", &ns.0]);
    // Somebody else's devices: one with a name vmfabric might want, one bystander.
    ip(&[
        "-n", &ns.0, "link", "add", "vmfbr9", "type", "veth", "peer", "name", "other0",
    ]);

    let name = ns.0.clone();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let links = Links::connect().unwrap();
            let gw = "10.66.0.1".parse().unwrap();
            let br = links
                .ensure_bridge("vmfbr0", "network lab", gw, 24, None)
                .await
                .unwrap();
            assert_eq!(
                links
                    .ensure_bridge("vmfbr0", "network lab", gw, 24, None)
                    .await
                    .unwrap(),
                br,
                "asked again: the same bridge"
            );
            let mac = fabric::Mac::derived(&["lab", "a"]);
            let opts = TapOptions {
                mac: Some(mac),
                owner: Some((1000, 1000)),
                ..Default::default()
            };
            let tap = links.ensure_tap("vmft0", "port lab/a", br, &opts).await.unwrap();
            assert_eq!(links.ensure_tap("vmft0", "port lab/a", br, &opts).await.unwrap(), tap);
            links
                .ensure_tap("vmft1", "port lab/gone", br, &TapOptions::default())
                .await
                .unwrap();
            assert!(matches!(
                links.ensure_bridge("vmfbr9", "network x", gw, 24, None).await,
                Err(HostnetError::Foreign { .. })
            ));
            assert!(matches!(
                links.remove("other0").await,
                Err(HostnetError::Foreign { .. })
            ));
            drop(links);

            // As after a crash: a new connection finds and adopts what is there.
            let links = Links::connect().unwrap();
            let owned = links.owned().await.unwrap();
            let names: HashSet<String> = owned.iter().map(|l| l.name.clone()).collect();
            assert_eq!(names, ["vmfbr0", "vmft0", "vmft1"].map(String::from).into());
            assert!(owned
                .iter()
                .any(|l| l.name == "vmft0" && l.controller == Some(br) && l.tag == "port lab/a"));
            assert_eq!(
                links
                    .ensure_bridge("vmfbr0", "network lab", gw, 24, None)
                    .await
                    .unwrap(),
                br
            );
            let known: HashSet<String> = ["vmfbr0", "vmft0"].map(String::from).into();
            assert!(
                links.remove_stale("another daemon", &known).await.unwrap().is_empty(),
                "another daemon's scope: nothing of ours is stale to it"
            );
            assert_eq!(
                links.remove_stale("port", &known).await.unwrap(),
                vec!["vmft1".to_string()]
            );
        });
    })
    .join()
    .unwrap();

    let all = ip(&["-n", &ns.0, "-d", "link", "show"]);
    assert!(
        all.contains("vmfbr9") && all.contains("other0"),
        "others' devices stay:\n{all}"
    );
    assert!(!all.contains("vmft1"), "the stale TAP is gone:\n{all}");
    let tap = ip(&["-n", &ns.0, "-d", "link", "show", "vmft0"]);
    let mac = fabric::Mac::derived(&["lab", "a"]).to_string();
    assert!(tap.contains("master vmfbr0"), "{tap}");
    assert!(tap.contains(&mac), "{tap}");
    assert!(tap.contains("alias vmfabric:port lab/a"), "{tap}");
    assert!(tap.contains("persist") || tap.contains("tun type tap"), "{tap}");
    let addr = ip(&["-n", &ns.0, "addr", "show", "vmfbr0"]);
    assert!(addr.contains("10.66.0.1/24"), "{addr}");
    assert_eq!(
        addr.matches("10.66.0.1/24").count(),
        1,
        "the address is not added twice"
    );
}

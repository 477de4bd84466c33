//! Every change undoes what it made when a later step fails: the store refusing
//! writes (a full disk) and the switch refusing a socket path stand for the
//! failures of each step. No root needed.
use super::*;
use crate::model::{ForwardProto, ForwardSpec};

fn name(text: &str) -> Name {
    Name::new("test", text).unwrap()
}

#[test]
fn a_change_that_fails_at_any_step_leaves_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("vmf-undo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctl = Control::start(dir.join("state"), dir.join("run")).unwrap();
    let socket = |port: &str| dir.join("run/ports/default").join(format!("{port}.stream"));
    let stored_ports = |ctl: &Control| -> Vec<String> {
        ctl.store
            .ports()
            .unwrap()
            .into_iter()
            .map(|p| p.unwrap().name)
            .collect()
    };

    // Persisting fails: the effect is undone.
    ctl.store.refuse_writes(true).unwrap();
    let net = NetworkSpec::new(name("u"), "10.55.0.0/24".parse().unwrap());
    assert!(matches!(
        ctl.create_network(net.clone(), true),
        Err(ControlError::Store(_))
    ));
    assert!(ctl.switch.network_counters("u").is_none(), "the switch network went");
    assert!(ctl.network("u").is_err());
    let port = PortSpec::new(name("p1"), PortKind::Stream);
    assert!(matches!(ctl.add_port("default", port), Err(ControlError::Store(_))));
    assert!(!socket("p1").exists(), "the socket went");
    assert!(ctl.ports("default").unwrap().is_empty());
    let fwd = ForwardSpec {
        proto: ForwardProto::Tcp,
        host: "127.0.0.1:0".parse().unwrap(),
        guest: "10.77.0.9:80".parse().unwrap(),
    };
    assert!(matches!(ctl.add_forward("default", fwd), Err(ControlError::Store(_))));
    assert!(ctl.forwards("default").unwrap().is_empty(), "the listener went");

    // A delete the store refuses changes nothing.
    ctl.store.refuse_writes(false).unwrap();
    let p2 = ctl
        .add_port("default", PortSpec::new(name("p2"), PortKind::Stream))
        .unwrap();
    ctl.store.refuse_writes(true).unwrap();
    assert!(ctl.remove_port("default", "p2").is_err());
    assert!(ctl.delete_network("default", true).is_err());
    assert_eq!(ctl.ports("default").unwrap().len(), 1);
    assert!(
        std::os::unix::net::UnixStream::connect(&p2.record.path).is_ok(),
        "still listening"
    );
    ctl.store.refuse_writes(false).unwrap();
    assert_eq!(stored_ports(&ctl), ["p2"]);

    // The effect fails: nothing is stored.
    std::fs::create_dir_all(socket("p3").parent().unwrap()).unwrap();
    let _squatter = std::os::unix::net::UnixListener::bind(socket("p3")).unwrap();
    let held = ctl.add_port("default", PortSpec::new(name("p3"), PortKind::Stream));
    assert!(
        matches!(held, Err(ControlError::Fabric(fabric::FabricError::PathInUse(_)))),
        "{held:?}"
    );
    assert_eq!(stored_ports(&ctl), ["p2"]);
    assert!(
        ctl.create_network(net, true).is_ok(),
        "the first failed create left nothing in the way"
    );
    ctl.shutdown();
}

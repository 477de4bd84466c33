//! Durable state: networks, ports and leases in SQLite.
//!
//! SQLite (rusqlite, bundled) rather than redb: the state is a handful of small
//! relational tables that users and tests inspect with `sqlite3`, and SQLite's WAL mode
//! with `synchronous=FULL` gives the guarantee we need: a write that returned is on
//! disk, so nothing acknowledged to an API client or a DHCP client is lost to `kill -9`.
//! Every write is one statement or one transaction.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use fabric::Mac;
use gateway::{Lease, Lease6, LeaseStore, StoreError};
use rusqlite::{params, Connection};

use crate::model::{ForwardProto, ForwardSpec, Mtu, Name, NetworkSpec};

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct DbError(#[from] rusqlite::Error);

/// A stored row that no longer parses (written by hand, or by a version that allowed
/// what this one refuses): its table, key and what is wrong. The rest of the store
/// still loads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored {table} {key:?}: {why}")]
pub struct BadRow {
    pub table: &'static str,
    pub key: String,
    pub why: String,
}

pub use crate::model::{mac_text, NetworkMode, PortKind, PortRecord, TapSettings};

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY,
    subnet TEXT NOT NULL,
    mtu INTEGER NOT NULL,
    gateway INTEGER NOT NULL,
    host_access INTEGER NOT NULL DEFAULT 0,
    mode TEXT NOT NULL DEFAULT 'userspace',
    isolated INTEGER NOT NULL DEFAULT 0,
    bridge TEXT,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS ports (
    network TEXT NOT NULL REFERENCES networks(name),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    mac TEXT NOT NULL,
    tap TEXT NOT NULL DEFAULT '{}',
    learn_mac_once INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, name)
);
CREATE TABLE IF NOT EXISTS reservations (
    network TEXT NOT NULL,
    key TEXT NOT NULL,
    ip TEXT NOT NULL,
    PRIMARY KEY (network, key)
);
CREATE TABLE IF NOT EXISTS policies (
    network TEXT PRIMARY KEY,
    policy TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forwards (
    network TEXT NOT NULL,
    host TEXT NOT NULL,
    guest TEXT NOT NULL,
    proto TEXT NOT NULL,
    PRIMARY KEY (host, proto)
);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    network TEXT NOT NULL,
    mac TEXT NOT NULL,
    ip TEXT NOT NULL,
    hostname TEXT,
    expires INTEGER NOT NULL,
    PRIMARY KEY (network, mac)
);
CREATE TABLE IF NOT EXISTS leases6 (
    network TEXT NOT NULL,
    mac TEXT NOT NULL,
    ip TEXT NOT NULL,
    duid TEXT NOT NULL,
    iaid INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (network, mac)
);
";

impl Store {
    /// Makes every write fail (as a full disk would) or work again: for the tests of
    /// the control plane's undo paths.
    #[doc(hidden)]
    pub fn refuse_writes(&self, refuse: bool) -> Result<(), DbError> {
        self.conn().pragma_update(None, "query_only", refuse)?;
        Ok(())
    }

    pub fn open(path: &Path) -> Result<Arc<Store>, DbError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        // Stores made before kernel mode lack these columns; existing ones are fine.
        for column in [
            "mode TEXT NOT NULL DEFAULT 'userspace'",
            "isolated INTEGER NOT NULL DEFAULT 0",
            // and these before gateway settings.
            "settings TEXT NOT NULL DEFAULT '{}'",
            // and this before IPv6 (NULL: IPv4 only).
            "ipv6 TEXT",
            // A cluster network's VNI; NULL for a host's own network.
            "vni INTEGER",
        ] {
            let _ = conn.execute(&format!("ALTER TABLE networks ADD COLUMN {column}"), []);
        }
        // Stores made before IPv6 reservations.
        let _ = conn.execute("ALTER TABLE reservations ADD COLUMN ipv6 TEXT", []);
        // Stores made before ports were locked from birth.
        let _ = conn.execute(
            "ALTER TABLE ports ADD COLUMN learn_mac_once INTEGER NOT NULL DEFAULT 0",
            [],
        );
        Ok(Arc::new(Store { conn: Mutex::new(conn) }))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put_network(&self, n: &NetworkSpec) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO networks (name, subnet, mtu, gateway, host_access, mode, isolated, bridge, settings, ipv6, vni) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                n.name.as_str(),
                n.subnet.to_string(),
                u32::from(n.mtu),
                n.gateway,
                n.host_access,
                n.mode.as_str(),
                n.isolated,
                n.bridge,
                serde_json::to_string(&n.settings).expect("plain data"),
                n.ipv6.map(|p| p.to_string()),
                n.vni.filter(|_| n.scope == crate::model::Scope::Cluster)
            ],
        )?;
        Ok(())
    }

    /// Removes a network with its ports and leases, in one transaction.
    pub fn delete_network(&self, name: &str) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM ports WHERE network = ?1", [name])?;
        tx.execute("DELETE FROM leases WHERE network = ?1", [name])?;
        tx.execute("DELETE FROM leases6 WHERE network = ?1", [name])?;
        tx.execute("DELETE FROM reservations WHERE network = ?1", [name])?;
        tx.execute("DELETE FROM policies WHERE network = ?1", [name])?;
        tx.execute("DELETE FROM forwards WHERE network = ?1", [name])?;
        tx.execute("DELETE FROM networks WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// Every stored network; a row that does not parse comes back as its [`BadRow`].
    pub fn networks(&self) -> Result<Vec<Result<NetworkSpec, BadRow>>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT name, subnet, mtu, gateway, host_access, mode, isolated, bridge, settings, ipv6, vni FROM networks ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            let name: String = r.get(0)?;
            let subnet: String = r.get(1)?;
            let mtu: u32 = r.get(2)?;
            let mode: String = r.get(5)?;
            let (gateway, host_access, isolated, bridge) = (r.get(3)?, r.get(4)?, r.get(6)?, r.get(7)?);
            let settings: String = r.get(8)?;
            let ipv6: Option<String> = r.get(9)?;
            let vni: Option<u32> = r.get(10)?;
            let bad = |why: String| BadRow {
                table: "network",
                key: name.clone(),
                why,
            };
            let parsed = (|| {
                Ok(NetworkSpec {
                    name: Name::new("network", &name).map_err(|e| bad(e.0))?,
                    subnet: subnet.parse().map_err(|e| bad(format!("subnet {subnet:?}: {e}")))?,
                    mtu: Mtu::try_from(mtu).map_err(|e| bad(e.0))?,
                    ipv6: match ipv6 {
                        Some(p) => Some(p.parse().map_err(|e| bad(format!("ipv6 {p:?}: {e}")))?),
                        None => None,
                    },
                    gateway,
                    host_access,
                    mode: match mode.as_str() {
                        "kernel" => NetworkMode::Kernel,
                        "userspace" => NetworkMode::Userspace,
                        other => return Err(bad(format!("mode {other:?}"))),
                    },
                    isolated,
                    bridge,
                    settings: serde_json::from_str(&settings).map_err(|e| bad(format!("settings: {e}")))?,
                    scope: match vni {
                        Some(_) => crate::model::Scope::Cluster,
                        None => crate::model::Scope::Host,
                    },
                    vni,
                })
            })();
            Ok(parsed)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_port(&self, p: &PortRecord) -> Result<(), DbError> {
        let kind = serde_json::to_value(p.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        self.conn().execute(
            "INSERT OR REPLACE INTO ports (network, name, kind, path, mac, tap, learn_mac_once) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                p.network,
                p.name,
                kind,
                p.path,
                p.mac.to_string(),
                serde_json::to_string(&p.tap).expect("plain data"),
                p.learn_mac_once
            ],
        )?;
        Ok(())
    }

    pub fn delete_port(&self, network: &str, name: &str) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM ports WHERE network = ?1 AND name = ?2", [network, name])?;
        Ok(())
    }

    /// Every stored port; a row that does not parse comes back as its [`BadRow`].
    pub fn ports(&self) -> Result<Vec<Result<PortRecord, BadRow>>, DbError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT network, name, kind, path, mac, tap, learn_mac_once FROM ports ORDER BY network, name")?;
        let rows = st.query_map([], |r| {
            let (network, name): (String, String) = (r.get(0)?, r.get(1)?);
            let (kind, path, mac, tap): (String, String, String, String) = (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
            let learn_mac_once: bool = r.get(6)?;
            let bad = |why: String| BadRow {
                table: "port",
                key: format!("{network}/{name}"),
                why,
            };
            let parsed = (|| {
                Ok(PortRecord {
                    kind: serde_json::from_value(serde_json::Value::String(kind.clone()))
                        .map_err(|_| bad(format!("kind {kind:?}")))?,
                    mac: mac.parse().map_err(|e| bad(format!("mac {mac:?}: {e}")))?,
                    tap: serde_json::from_str(&tap).map_err(|e| bad(format!("tap settings {tap:?}: {e}")))?,
                    network: network.clone(),
                    name: name.clone(),
                    path,
                    learn_mac_once,
                })
            })();
            Ok(parsed)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A network's reservations: (key, address); a key is a MAC or a VM name.
    pub fn reservations(&self, network: &str) -> Result<Vec<(String, Ipv4Addr)>, DbError> {
        Ok(self
            .reservations_with_ipv6(network)?
            .into_iter()
            .map(|(key, ip, _)| (key, ip))
            .collect())
    }

    /// The same with each one's IPv6 address, if it has one.
    #[allow(clippy::type_complexity)]
    pub fn reservations_with_ipv6(
        &self,
        network: &str,
    ) -> Result<Vec<(String, Ipv4Addr, Option<std::net::Ipv6Addr>)>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT key, ip, ipv6 FROM reservations WHERE network = ?1 ORDER BY key")?;
        let rows = st.query_map([network], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, ip, ipv6) = row?;
            if let Ok(ip) = ip.parse() {
                out.push((key, ip, ipv6.and_then(|a| a.parse().ok())));
            }
        }
        Ok(out)
    }

    pub fn put_reservation(
        &self,
        network: &str,
        key: &str,
        ip: Ipv4Addr,
        ipv6: Option<std::net::Ipv6Addr>,
    ) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO reservations (network, key, ip, ipv6) VALUES (?1, ?2, ?3, ?4)",
            params![network, key, ip.to_string(), ipv6.map(|a| a.to_string())],
        )?;
        Ok(())
    }

    /// Returns whether there was one.
    pub fn delete_reservation(&self, network: &str, key: &str) -> Result<bool, DbError> {
        let n = self.conn().execute(
            "DELETE FROM reservations WHERE network = ?1 AND key = ?2",
            [network, key],
        )?;
        Ok(n > 0)
    }

    /// A network's egress policy as the API wrote it (JSON), if one was set.
    pub fn policy(&self, network: &str) -> Result<Option<String>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT policy FROM policies WHERE network = ?1")?;
        let mut rows = st.query_map([network], |r| r.get::<_, String>(0))?;
        Ok(rows.next().transpose()?)
    }

    pub fn put_policy(&self, network: &str, json: &str) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO policies (network, policy) VALUES (?1, ?2)",
            [network, json],
        )?;
        Ok(())
    }

    /// A network's forwards: (host address, guest address, protocol).
    /// A network's forwards; a row that does not parse comes back as its [`BadRow`].
    pub fn forwards(&self, network: &str) -> Result<Vec<Result<ForwardSpec, BadRow>>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT host, guest, proto FROM forwards WHERE network = ?1 ORDER BY host")?;
        let rows = st.query_map([network], |r| {
            let (host, guest, proto): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let bad = |why: String| BadRow {
                table: "forward",
                key: format!("{network}/{host}/{proto}"),
                why,
            };
            Ok((|| {
                Ok(ForwardSpec {
                    proto: proto.parse().map_err(|e: crate::model::Invalid| bad(e.0))?,
                    host: host.parse().map_err(|e| bad(format!("host {host:?}: {e}")))?,
                    guest: guest.parse().map_err(|e| bad(format!("guest {guest:?}: {e}")))?,
                })
            })())
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_forward(&self, network: &str, f: &ForwardSpec) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO forwards (network, host, guest, proto) VALUES (?1, ?2, ?3, ?4)",
            [network, &f.host.to_string(), &f.guest.to_string(), f.proto.as_str()],
        )?;
        Ok(())
    }

    pub fn delete_forward(&self, host: &str, proto: ForwardProto) -> Result<bool, DbError> {
        Ok(self.conn().execute(
            "DELETE FROM forwards WHERE host = ?1 AND proto = ?2",
            [host, proto.as_str()],
        )? > 0)
    }

    /// Running VMs, as JSON records, to adopt them after a restart.
    pub fn vms(&self) -> Result<Vec<String>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT record FROM vms ORDER BY name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_vm(&self, name: &str, record: &str) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO vms (name, record) VALUES (?1, ?2)",
            [name, record],
        )?;
        Ok(())
    }

    pub fn delete_vm(&self, name: &str) -> Result<(), DbError> {
        self.conn().execute("DELETE FROM vms WHERE name = ?1", [name])?;
        Ok(())
    }

    /// The lease store of one network's gateway.
    pub fn leases_of(self: &Arc<Self>, network: &str) -> SqliteLeaseStore {
        SqliteLeaseStore {
            store: self.clone(),
            network: network.to_string(),
        }
    }
}

/// A network's leases in the store: written before the DHCP ACK leaves.
pub struct SqliteLeaseStore {
    store: Arc<Store>,
    network: String,
}

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl LeaseStore for SqliteLeaseStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        let conn = self.store.conn();
        let mut st = conn
            .prepare("SELECT mac, ip, hostname, expires FROM leases WHERE network = ?1")
            .map_err(store_err)?;
        let rows = st
            .query_map([&self.network], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(store_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (mac, ip, hostname, expires) = row.map_err(store_err)?;
            let (Ok(mac), Ok(ip)) = (mac.parse::<Mac>(), ip.parse::<Ipv4Addr>()) else {
                return Err(StoreError(format!("unreadable lease row {mac} {ip}")));
            };
            out.push(Lease {
                mac,
                ip,
                hostname,
                expires: expires.max(0) as u64,
            });
        }
        Ok(out)
    }

    fn save(&mut self, lease: &Lease) -> Result<(), StoreError> {
        self.store
            .conn()
            .execute(
                "INSERT OR REPLACE INTO leases (network, mac, ip, hostname, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    self.network,
                    lease.mac.to_string(),
                    lease.ip.to_string(),
                    lease.hostname,
                    lease.expires as i64
                ],
            )
            .map_err(store_err)?;
        Ok(())
    }

    fn remove(&mut self, mac: Mac) -> Result<(), StoreError> {
        self.store
            .conn()
            .execute(
                "DELETE FROM leases WHERE network = ?1 AND mac = ?2",
                params![self.network, mac.to_string()],
            )
            .map_err(store_err)?;
        Ok(())
    }

    fn load6(&self) -> Result<Vec<Lease6>, StoreError> {
        let conn = self.store.conn();
        let mut st = conn
            .prepare("SELECT mac, ip, duid, iaid, expires FROM leases6 WHERE network = ?1")
            .map_err(store_err)?;
        let rows = st
            .query_map([&self.network], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(store_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (mac, ip, duid, iaid, expires) = row.map_err(store_err)?;
            let parsed = (mac.parse::<Mac>(), ip.parse::<std::net::Ipv6Addr>(), from_hex(&duid));
            let (Ok(mac), Ok(ip), Some(duid)) = parsed else {
                return Err(StoreError(format!("unreadable DHCPv6 lease row {mac} {ip}")));
            };
            out.push(Lease6 {
                mac,
                ip,
                duid,
                iaid: u32::try_from(iaid).unwrap_or_default(),
                expires: expires.max(0) as u64,
            });
        }
        Ok(out)
    }

    fn save6(&mut self, lease: &Lease6) -> Result<(), StoreError> {
        let duid: String = lease.duid.iter().map(|b| format!("{b:02x}")).collect();
        self.store
            .conn()
            .execute(
                "INSERT OR REPLACE INTO leases6 (network, mac, ip, duid, iaid, expires) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    self.network,
                    lease.mac.to_string(),
                    lease.ip.to_string(),
                    duid,
                    i64::from(lease.iaid),
                    lease.expires as i64
                ],
            )
            .map_err(store_err)?;
        Ok(())
    }

    fn remove6(&mut self, mac: Mac) -> Result<(), StoreError> {
        self.store
            .conn()
            .execute(
                "DELETE FROM leases6 WHERE network = ?1 AND mac = ?2",
                params![self.network, mac.to_string()],
            )
            .map_err(store_err)?;
        Ok(())
    }
}

/// Bytes from lower-case hex (a DUID as stored); `None` if it is not hex.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

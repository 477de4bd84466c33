//! State shared by the hosts of a cluster, in etcd (v3 API): what must be the same on
//! every host, decided once. Here, so far: which guest holds an address of a cluster
//! network. An address is claimed by one etcd transaction (create the address's key if
//! it has never been created), so two hosts answering DHCP at the same moment can
//! never hand out the same address; the loser is told who holds it. Single-host state
//! stays in SQLite ([`crate::store`]).

use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};
use fabric::Mac;

/// Why the cluster's state could not be read or changed. A caller that cannot reach
/// etcd fails closed: no address is handed out on a guess.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd holds {key} = {value:?}, which is not a MAC")]
    Corrupt { key: String, value: String },
}

/// What a claim on an address came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The address is now this MAC's.
    Won,
    /// It already was (a renewal, or the same claim again).
    Held,
    /// Another MAC holds it.
    TakenBy(Mac),
}

/// A connection to the cluster's etcd, its keys under `prefix`.
#[derive(Clone)]
pub struct ClusterStore {
    client: Client,
    prefix: String,
}

impl ClusterStore {
    /// Connects to any of `endpoints` (`http://host:port`); each request gives up
    /// after `timeout`, so an unreachable etcd costs a client one retry, not a hang.
    pub async fn connect(endpoints: &[String], prefix: &str, timeout: Duration) -> Result<ClusterStore, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(ClusterStore {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    fn address_key(&self, network: &str, ip: Ipv4Addr) -> String {
        format!("{}/networks/{network}/addresses/{ip}", self.prefix)
    }

    /// Claims `ip` on `network` for `mac`, in one transaction: if the address's key was
    /// never created, it is now, with `mac`; else the holder is read in the same
    /// transaction.
    pub async fn claim_address(&self, network: &str, ip: Ipv4Addr, mac: Mac) -> Result<Claim, ClusterError> {
        let key = self.address_key(network, ip);
        loop {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), mac.to_string(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = self.client.clone().txn(txn).await?;
            if response.succeeded() {
                return Ok(Claim::Won);
            }
            let holder = response.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            // The compare and the read see one revision; no holder means the key was
            // created and deleted again (a release): the address is free, claim again.
            let Some(holder) = holder else { continue };
            let value = String::from_utf8_lossy(&holder).into_owned();
            let holder: Mac = value.parse().map_err(|_| ClusterError::Corrupt { key, value })?;
            return Ok(if holder == mac {
                Claim::Held
            } else {
                Claim::TakenBy(holder)
            });
        }
    }

    /// Gives `ip` up if `mac` holds it (one transaction: compare the holder, delete);
    /// whether it did.
    pub async fn release_address(&self, network: &str, ip: Ipv4Addr, mac: Mac) -> Result<bool, ClusterError> {
        let key = self.address_key(network, ip);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, mac.to_string())])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }
}

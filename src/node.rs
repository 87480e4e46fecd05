//! A node's place among several cqrsd processes on one Kafka cluster
//! (DESIGN.md §7): its role, the sides of the API it runs, and the URLs by
//! which nodes reach each other.
//!
//! No IO here: the daemon decides from the role what to start, and the edge
//! (`http::edge`) forwards what the role does not run.

use serde::{Deserialize, Serialize};

/// What a node runs. Every node serves the whole REST API; what it does not
/// run itself it forwards to a peer that does.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The write side and the read side in one process (the single-process
    /// design, and the default).
    #[default]
    All,
    /// The write side only: commands and `GET /aggregates/...`.
    Command,
    /// The read side only: complete read models of its own, fed from the
    /// topics; views, aggregations, search, the event stream.
    Query,
}

/// How the command nodes of a cluster share each aggregate topic's
/// partitions.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Ownership {
    /// One node runs the write side for every partition (the default, and
    /// the only choice for role `all`).
    #[default]
    None,
    /// Several command nodes split the partitions through the consumer
    /// group `<topic_prefix>.command-owners`; every node routes a command
    /// to its partition's owner, named in the owner map.
    Group,
}

/// Every partition's owner, as the node knows it: the URL of the command
/// node that serves it. Implemented by the Kafka backend's owner map; the
/// edge asks it where a command goes.
pub trait OwnerLookup: Send + Sync + std::fmt::Debug {
    /// The canonical URL of the partition's owner, if one was published.
    fn owner(&self, topic: &str, partition: u32) -> Option<String>;
}

/// What a command node of a group says about its partitions, for
/// `GET /admin/node`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnershipReport {
    /// The partitions it serves now, as `topic:partition`, sorted.
    pub owned: Vec<String>,
    /// Assignments received from the group (one per rebalance).
    pub assignments: u64,
    /// Revocations received, lost ones included.
    pub revocations: u64,
    /// Revocations after this node's session had expired.
    pub lost: u64,
    /// Times another node fenced this one's producer of a partition.
    pub fenced: u64,
    /// The last assignment's takeover: from the assignment to every
    /// partition of it accepting commands.
    pub last_takeover: Option<std::time::Duration>,
}

/// The source of a node's [`OwnershipReport`].
pub trait OwnershipSource: Send + Sync + std::fmt::Debug {
    fn report(&self) -> OwnershipReport;
}

/// One half of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// Commands and aggregate reads, answered by the write side.
    Command,
    /// Read models and the event stream.
    Query,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Command, Side::Query];

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Command => "command",
            Side::Query => "query",
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Role {
    /// Whether a node of this role runs `side` itself.
    pub fn runs(self, side: Side) -> bool {
        matches!(
            (self, side),
            (Role::All, _) | (Role::Command, Side::Command) | (Role::Query, Side::Query)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Command => "command",
            Role::Query => "query",
        }
    }

    /// The role as `/readyz` spells it, if it is one.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "all" => Some(Role::All),
            "command" => Some(Role::Command),
            "query" => Some(Role::Query),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a node URL (`advertise_url` or a peer) into its canonical base,
/// `http://host:port` with a lowercase host and an explicit port, so that two
/// spellings of one node compare equal. Only plain `http` is accepted: the
/// edge's client speaks no TLS, so an `https` peer could never be reached.
pub fn canonical_url(text: &str) -> Result<String, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|error| format!("`{text}` is not a URL ({error})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "`{text}`: scheme `{other}` is not supported; nodes reach each other over plain http"
            ));
        }
        None => return Err(format!("`{text}` has no scheme; write http://host:port")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("`{text}` names no host; write http://host:port"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{text}`: credentials in a node URL are not supported"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{text}` has a path or query; a node URL is only http://host:port"
        ));
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("`{text}` names no host; write http://host:port"));
    }
    let port = authority.port_u16().unwrap_or(80);
    Ok(format!("http://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_run_their_sides() {
        assert!(Role::All.runs(Side::Command) && Role::All.runs(Side::Query));
        assert!(Role::Command.runs(Side::Command) && !Role::Command.runs(Side::Query));
        assert!(Role::Query.runs(Side::Query) && !Role::Query.runs(Side::Command));
        for role in [Role::All, Role::Command, Role::Query] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("edge"), None);
    }

    #[test]
    fn node_urls_have_one_canonical_spelling() {
        assert_eq!(
            canonical_url("http://LocalHost:8080/").unwrap(),
            "http://localhost:8080"
        );
        assert_eq!(
            canonical_url("http://10.0.0.5").unwrap(),
            "http://10.0.0.5:80"
        );
        assert_eq!(
            canonical_url("http://[::1]:9000").unwrap(),
            "http://[::1]:9000"
        );
        for bad in [
            "10.0.0.5:8080",
            "https://10.0.0.5:8080",
            "http://10.0.0.5:8080/api",
            "http://10.0.0.5:8080/?x=1",
            "http://user:pw@10.0.0.5:8080",
            "http://",
            "not a url",
            "",
        ] {
            assert!(canonical_url(bad).is_err(), "{bad} was accepted");
        }
    }
}

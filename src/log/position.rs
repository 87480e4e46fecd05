//! Positions in the event log and topic names.
//!
//! A position names one record: `(topic, partition, offset)`. Clients see it as an opaque
//! string, but the string form `<topic>:<partition>:<offset>` is stable so positions
//! survive restarts, appear in `ETag`-like replies, and are accepted back by queries.

use std::fmt;
use std::str::FromStr;

/// Kafka's limit on topic name length; the embedded log keeps the same rule so a
/// configuration valid for one backend is valid for the other.
pub const MAX_TOPIC_LEN: usize = 249;

/// One record's place in the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

/// Why a topic name or a position string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("a position has the form <topic>:<partition>:<offset>, got {0:?}")]
    Malformed(String),
    #[error("invalid partition {value:?} in position: expected a non-negative integer")]
    BadPartition { value: String },
    #[error("invalid offset {value:?} in position: expected a non-negative integer")]
    BadOffset { value: String },
    #[error("invalid topic name {name:?}: {reason}")]
    BadTopic { name: String, reason: &'static str },
}

impl Position {
    pub fn new(topic: impl Into<String>, partition: u32, offset: u64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Topic names cannot contain ':', so splitting from the right is unambiguous.
        let mut parts = s.rsplitn(3, ':');
        let (Some(offset), Some(partition), Some(topic)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(PositionError::Malformed(s.to_owned()));
        };
        validate_topic_name(topic)?;
        // `u32::from_str` accepts a leading '+', which would give one position two spellings.
        let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        if !digits(partition) {
            return Err(PositionError::BadPartition {
                value: partition.to_owned(),
            });
        }
        if !digits(offset) {
            return Err(PositionError::BadOffset {
                value: offset.to_owned(),
            });
        }
        let partition = partition.parse().map_err(|_| PositionError::BadPartition {
            value: partition.to_owned(),
        })?;
        let offset = offset.parse().map_err(|_| PositionError::BadOffset {
            value: offset.to_owned(),
        })?;
        Ok(Position {
            topic: topic.to_owned(),
            partition,
            offset,
        })
    }
}

/// Checks a topic name against the rules shared with Kafka: 1 to 249 characters from
/// `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), PositionError> {
    let bad = |reason| {
        Err(PositionError::BadTopic {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_TOPIC_LEN {
        return bad("it is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not allowed");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The topic of an aggregate type: `<prefix>.<aggregate>`, validated.
pub fn topic_name(prefix: &str, aggregate: &str) -> Result<String, PositionError> {
    let name = format!("{prefix}.{aggregate}");
    validate_topic_name(&name)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let p = Position::new("cqrsd.account", 3, 17);
        assert_eq!(p.to_string(), "cqrsd.account:3:17");
        assert_eq!("cqrsd.account:3:17".parse::<Position>().unwrap(), p);
        let max = Position::new("a-b_c.d", u32::MAX, u64::MAX);
        assert_eq!(max.to_string().parse::<Position>().unwrap(), max);
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(matches!(
            "nope".parse::<Position>(),
            Err(PositionError::Malformed(_))
        ));
        assert!(matches!(
            "a:1".parse::<Position>(),
            Err(PositionError::Malformed(_))
        ));
        assert!(matches!(
            "t:x:1".parse::<Position>(),
            Err(PositionError::BadPartition { .. })
        ));
        assert!(matches!(
            "t:+1:1".parse::<Position>(),
            Err(PositionError::BadPartition { .. })
        ));
        assert!(matches!(
            "t:1:-1".parse::<Position>(),
            Err(PositionError::BadOffset { .. })
        ));
        assert!(matches!(
            "t:1:".parse::<Position>(),
            Err(PositionError::BadOffset { .. })
        ));
        assert!(matches!(
            "t:99999999999:1".parse::<Position>(),
            Err(PositionError::BadPartition { .. })
        ));
        assert!(matches!(
            "a:b:1:2".parse::<Position>(),
            Err(PositionError::BadTopic { .. })
        ));
        assert!(matches!(
            ":1:2".parse::<Position>(),
            Err(PositionError::BadTopic { .. })
        ));
        assert!(matches!(
            "t o:1:2".parse::<Position>(),
            Err(PositionError::BadTopic { .. })
        ));
        let msg = "t:x:1".parse::<Position>().unwrap_err().to_string();
        assert!(msg.contains("partition"), "{msg}");
    }

    #[test]
    fn topic_names() {
        assert_eq!(topic_name("cqrsd", "account").unwrap(), "cqrsd.account");
        assert!(topic_name("cqrsd", "bad name").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
        assert!(validate_topic_name(&"a".repeat(249)).is_ok());
    }
}

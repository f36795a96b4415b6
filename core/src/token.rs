//! Consistency tokens: `partition:offset`, the position a command's event reached in the log.
//!
//! A client hands the token back on reads; the query side waits until its projections have
//! applied that offset of that partition. Because every event of a person lives in one
//! partition, a token from a person's latest command covers all of that person's history.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsistencyToken {
    pub partition: u32,
    pub offset: u64,
}

/// The header clients send and receive tokens in.
pub const HEADER: &str = "callisto-consistency-token";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("consistency token {0:?} is not of the form <partition>:<offset>, e.g. \"3:1042\"")]
pub struct BadToken(pub String);

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

impl FromStr for ConsistencyToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadToken(s.chars().take(64).collect());
        let (partition, offset) = s.split_once(':').ok_or_else(bad)?;
        let digits = |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(partition) || !digits(offset) {
            return Err(bad());
        }
        Ok(Self { partition: partition.parse().map_err(|_| bad())?, offset: offset.parse().map_err(|_| bad())? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_junk() {
        let t = ConsistencyToken { partition: 7, offset: 1_000_042 };
        assert_eq!(t.to_string(), "7:1000042");
        assert_eq!("7:1000042".parse::<ConsistencyToken>(), Ok(t));
        for junk in
            ["", ":", "7:", ":5", "a:1", "1:b", "1:2:3", "-1:4", "1: 2", "99999999999:1", "1:99999999999999999999999"]
        {
            assert!(junk.parse::<ConsistencyToken>().is_err(), "{junk:?} must be rejected");
        }
    }
}

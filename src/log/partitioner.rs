//! The partitioner: Kafka's Java default partitioner for keyed records.
//!
//! Using the exact same function as Kafka's `DefaultPartitioner` / `BuiltInPartitioner`
//! means an aggregate lands on the same partition whichever backend or client computes
//! it, so the embedded log and a Kafka topic with the same partition count agree.

/// Kafka's `Utils.murmur2`: the 32-bit MurmurHash2 variant with Kafka's fixed seed.
///
/// The result is returned as `i32` because that is how Kafka publishes its test vectors.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Kafka's `length` is a Java int; keys longer than i32::MAX cannot exist there, and
    // truncation keeps this function total for any input here.
    let length = data.len() as u32;
    let mut h: u32 = SEED ^ length;

    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }

    // The Java version falls through the switch cases; this mirrors it explicitly.
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }

    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of an aggregate: `(murmur2(utf8(id)) & 0x7fffffff) % partitions`.
///
/// A partition count of zero is a configuration error caught elsewhere; it maps to
/// partition 0 here so that this function can never panic.
pub fn partition_for(aggregate_id: &str, partitions: u32) -> u32 {
    if partitions == 0 {
        return 0;
    }
    let positive = (murmur2(aggregate_id.as_bytes()) as u32) & 0x7fff_ffff;
    positive % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's `clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java`.
    #[test]
    fn murmur2_matches_kafka_test_vectors() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                *expected,
                "murmur2({:?})",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn partition_is_positive_hash_modulo_count() {
        // toPositive(-973932308) = 1173551340; 1173551340 % 8 = 4.
        assert_eq!(partition_for("21", 8), 1_173_551_340 % 8);
        assert_eq!(partition_for("abc", 3), 479_470_107 % 3);
        assert_eq!(partition_for("anything", 1), 0);
        assert_eq!(partition_for("anything", 0), 0);
        for p in 1..20 {
            assert!(partition_for("foobar", p) < p);
        }
    }
}

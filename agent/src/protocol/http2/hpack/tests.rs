//! Golden tests: RFC 7541 Appendix C, then the same blocks decoded from the middle.
use super::*;

fn hex(s: &str) -> Bytes {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    Bytes::from(
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect::<Vec<u8>>(),
    )
}

fn known(pairs: &[(&str, &str)]) -> Vec<Field> {
    pairs
        .iter()
        .map(|(n, v)| Field {
            name: Some(Bytes::copy_from_slice(n.as_bytes())),
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
        })
        .collect()
}

fn decode(d: &mut Decoder, block: &str) -> (Vec<Field>, BlockStats) {
    let mut out = Vec::new();
    let stats = d.decode(&hex(block), &mut out).expect("valid block");
    (out, stats)
}

fn table(d: &Decoder) -> Vec<(String, String)> {
    d.table
        .iter()
        .map(|e| {
            let s = |b: &Option<Bytes>| {
                b.as_deref()
                    .map_or("?".into(), |b| String::from_utf8_lossy(b).into_owned())
            };
            (s(&e.name), s(&e.value))
        })
        .collect()
}

// RFC 7541 C.3 (requests without Huffman) and C.4 (the same requests, Huffman-coded).
const C3: [&str; 3] = [
    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "8286 84be 5808 6e6f 2d63 6163 6865",
    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
];
const C4: [&str; 3] = [
    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
    "8286 84be 5886 a8eb 1064 9cbf",
    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
];

fn c3_requests() -> [Vec<Field>; 3] {
    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    let mut second = first.to_vec();
    second.push(("cache-control", "no-cache"));
    [
        known(&first),
        known(&second),
        known(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ]),
    ]
}

#[test]
fn rfc7541_c3_and_c4_requests() {
    for blocks in [C3, C4] {
        let mut d = Decoder::new();
        for (block, want) in blocks.iter().zip(c3_requests()) {
            let (got, stats) = decode(&mut d, block);
            assert_eq!(got, want);
            assert_eq!(stats.unresolved, 0);
        }
        assert_eq!(
            table(&d),
            [
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(d.size, 164);
        assert!(d.in_sync());
    }
}

// RFC 7541 C.5 and C.6: responses with a 256-byte table, so that entries are evicted.
const C5: [&str; 3] = [
    "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a
     3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "4803 3330 37c1 c0bf",
    "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04
     677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49
     553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
];
const C6: [&str; 3] = [
    "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e
     919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
    "4883 640e ffc1 c0bf",
    "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7
     821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed
     4ee5 b106 3d50 07",
];

fn c5_responses() -> [Vec<Field>; 3] {
    let first = [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    let mut second = first;
    second[0].1 = "307";
    [
        known(&first),
        known(&second),
        known(&[
            (":status", "200"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ("location", "https://www.example.com"),
            ("content-encoding", "gzip"),
            (
                "set-cookie",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ]),
    ]
}

#[test]
fn rfc7541_c5_and_c6_responses_with_eviction() {
    for blocks in [C5, C6] {
        let mut d = Decoder::new();
        d.resize(256);
        for (block, want) in blocks.iter().zip(c5_responses()) {
            let (got, _) = decode(&mut d, block);
            assert_eq!(got, want);
        }
        assert_eq!(
            table(&d),
            [
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
                ("content-encoding", "gzip"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(d.size, 215);
    }
}

#[test]
fn mid_stream_fields_from_before_are_unknown_and_later_insertions_exact() {
    let mut d = Decoder::mid_stream();
    // C.3.2 refers to :authority (inserted by C.3.1, never seen): unknown, the rest decodes.
    let (got, stats) = decode(&mut d, C3[1]);
    assert_eq!(stats.unresolved, 1);
    assert_eq!(
        got[..3],
        known(&[(":method", "GET"), (":scheme", "http"), (":path", "/")])
    );
    assert_eq!(
        got[3],
        Field {
            name: None,
            value: None
        }
    );
    assert_eq!(got[4], known(&[("cache-control", "no-cache")])[0]);
    // C.3.3: index 63 is still the unseen :authority; its own insertion is known.
    let (got, stats) = decode(&mut d, C3[2]);
    assert_eq!(stats.unresolved, 1);
    assert_eq!(got[3].name, None);
    assert_eq!(got[4], known(&[("custom-key", "custom-value")])[0]);
    // A block that refers to the two entries seen: exact (62 custom-key, 63 cache-control).
    let (got, stats) = decode(&mut d, "82 be bf");
    assert_eq!(stats.unresolved, 0);
    assert_eq!(
        got,
        known(&[
            (":method", "GET"),
            ("custom-key", "custom-value"),
            ("cache-control", "no-cache")
        ])
    );
    assert!(!d.in_sync());
}

#[test]
fn a_literal_whose_name_is_unknown_keeps_its_value_and_its_position() {
    let mut d = Decoder::mid_stream();
    // Literal with incremental indexing, name = dynamic index 62 (unknown), value "v".
    let (got, stats) = decode(&mut d, "7f 00 01 76");
    assert_eq!(stats.unresolved, 1);
    assert_eq!(got[0].name, None);
    assert_eq!(got[0].value.as_deref(), Some(&b"v"[..]));
    // Now index 62 is that entry: its value is known, its name not.
    let (got, _) = decode(&mut d, "be");
    assert_eq!(got[0].value.as_deref(), Some(&b"v"[..]));
    assert_eq!(got[0].name, None);
}

#[test]
fn a_table_size_update_resynchronises() {
    let mut d = Decoder::mid_stream();
    // Size update to 0 (everything evicted), then back to 4096: nothing unknown is left.
    let (got, _) = decode(&mut d, "20 3fe1 1f 82");
    assert_eq!(got, known(&[(":method", "GET")]));
    assert!(d.in_sync());
    // Known entries that fill a known-size table also leave no room for unseen ones.
    let mut d = Decoder::mid_stream();
    decode(&mut d, "3f 21"); // size update to 64
    assert!(!d.in_sync());
    decode(&mut d, "40 01 61 01 62"); // a: b, 34 bytes
    assert!(d.in_sync());
}

#[test]
fn losing_sync_forgets_every_position() {
    let mut d = Decoder::new();
    decode(&mut d, C3[0]);
    d.lose_sync();
    let (got, stats) = decode(&mut d, "be");
    assert_eq!(stats.unresolved, 1);
    assert_eq!(got[0].name, None);
}

#[test]
fn malformed_blocks_are_errors_and_lose_sync() {
    for (block, err) in [
        ("80", HpackError::ZeroIndex),
        ("ff", HpackError::Truncated),
        ("ff ff ff ff ff ff 7f", HpackError::IntegerOverflow),
        ("40 05 61", HpackError::Truncated),
        ("82 20", HpackError::LateSizeUpdate),
        // Huffman: four bytes of ones hold the EOS symbol (30 ones), which a string never may.
        ("40 84 ff ff ff ff 00", HpackError::Huffman),
    ] {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        assert_eq!(d.decode(&hex(block), &mut out), Err(err), "{block}");
        assert!(!d.in_sync(), "{block}");
    }
    let mut d = Decoder::new();
    let mut out = Vec::new();
    let many = hex(&"82".repeat(MAX_FIELDS + 1));
    assert_eq!(d.decode(&many, &mut out), Err(HpackError::TooManyFields));
}

#[test]
fn bounded_memory_whatever_table_size_is_announced() {
    let mut d = Decoder::mid_stream();
    // Size update to 1 MiB, then 100 entries of 1 KiB each.
    decode(&mut d, "3f e1 ff 3f");
    let value = "61".repeat(1000);
    for _ in 0..100 {
        decode(&mut d, &format!("40 01 6e 7f e9 06 {value}"));
    }
    assert!(d.size <= MAX_KEPT_TABLE_SIZE);
    assert!(
        !d.in_sync(),
        "entries dropped for memory are unknown positions"
    );
}

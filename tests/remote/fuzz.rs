//! The request decoder against arbitrary and mutated bytes (a bounded proptest run): it answers, never
//! panics, and the server keeps serving after garbage.

use super::*;
use proptest::prelude::*;

fn valid() -> Vec<u8> {
    let mut graph = saving_graph();
    let c = graph.push(
        nnsight::graph::Op::Const {
            value: nnsight::graph::Constant::Tensor(
                nnsight::graph::TensorData::from_tensor(&Tensor::from_slice(&[1.0f32, 2.0, 3.0])).unwrap(),
            ),
        },
        0,
    );
    graph.push(nnsight::graph::Op::Save { value: c }, 0);
    trace_request(graph, PROTOCOL_VERSION)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_crash_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = nnsight::remote::protocol::decode_request(&bytes);
    }

    #[test]
    fn mutated_requests_never_crash_the_decoder(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = valid();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let _ = nnsight::remote::protocol::decode_request(&bytes);
        let end = cut.index(bytes.len());
        let _ = nnsight::remote::protocol::decode_request(&bytes[..end]);
    }
}

#[test]
fn the_server_answers_garbage_and_keeps_serving() {
    let mut bytes = valid();
    assert!(nnsight::remote::protocol::decode_request(&bytes).is_ok(), "the unmutated request is valid");
    for i in (0..bytes.len()).step_by(7) {
        bytes[i] ^= 0x5a;
        let (code, _) = post(&bytes, Some(KEY));
        assert!(code == 202 || code == 400 || code == 404 || code == 422, "status {code}");
    }
    still_serves();
}

//! Arbitrary bytes -> JSON -> an outbox row -> conversion: never a panic, and any event is well formed
//! (delta_bridge::fuzzing::convert_row says what it checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    delta_bridge::fuzzing::convert_row(data);
});

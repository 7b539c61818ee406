#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rlhf::fuzzing::model_config(data));

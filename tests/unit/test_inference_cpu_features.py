"""meshkit/cpu_features.py: reading the CPU flags the kernels depend on."""
from meshkit.cpu_features import CpuFeatures, parse_flags, read_cpu_features

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2
"""


def test_the_first_processors_flags_are_read():
    flags = parse_flags(INTEL_AMX)
    assert {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"} <= flags
    assert "spectre_v1" not in flags
    features = CpuFeatures("AVX512", flags)
    assert features.avx512_bf16 and features.avx512_vnni and features.amx_bf16
    assert features.summary() == "torch AVX512; avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8"


def test_an_avx2_only_cpu_has_none_of_the_avx512_features():
    features = CpuFeatures("AVX2", parse_flags("flags\t: fpu sse2 avx avx2 fma\n"))
    assert not (features.avx512_bf16 or features.avx512_vnni or features.amx_bf16)
    assert features.summary() == "torch AVX2; avx2"


def test_arm_features_and_missing_files_give_what_there_is(tmp_path):
    assert parse_flags("Features\t: fp asimd sve\n") == {"fp", "asimd", "sve"}
    features = read_cpu_features(tmp_path / "no-cpuinfo")
    assert features.flags == frozenset()
    assert features.capability  # torch's own answer, whatever the machine
    assert features.summary().endswith("none of avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8")

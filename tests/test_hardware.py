"""The CPU's bf16 support, as the trainer (and the engine) decide their precision by it."""
from geochange.engine.hardware import cpu_bf16, cpu_capabilities, cpu_name


def test_bf16_where_the_cpu_computes_in_it():
    assert cpu_bf16({"cpu_name": "Xeon", "amx_bf16": True, "avx512_bf16": True}) == \
        (True, "Xeon has AMX-BF16 and AVX512-BF16")
    assert cpu_bf16({"cpu_name": "AMD EPYC", "avx512_bf16": True}) == (True, "AMD EPYC has AVX512-BF16")
    assert cpu_bf16({"cpu_name": "Core i7", "avx2": True, "avx512_bf16": False}) == \
        (False, "Core i7 has neither AMX-BF16 nor AVX512-BF16")


def test_this_machine_is_described():
    caps = cpu_capabilities()
    assert cpu_name() and cpu_bf16()[0] == bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))

import pytest

from estimate.hardware import (
    PRECISIONS,
    REQUIRED_FIELDS,
    catalog_peak,
    get_accelerator,
    load_catalog,
    match_device_name,
)

REQUIRED_ACCELERATORS = [
    "V100-SXM2-32GB", "A100-SXM4-40GB", "A100-SXM4-80GB", "A800-SXM4-80GB", "H100-SXM5-80GB",
    "H100-PCIe-80GB", "H800-SXM5-80GB", "H200-SXM-141GB", "B200-HGX", "GB200", "MI250X",
    "MI300X", "TPU-v4", "TPU-v5e", "TPU-v5p",
]


def test_required_accelerators_present():
    catalog = load_catalog()
    for name in REQUIRED_ACCELERATORS:
        assert name in catalog


@pytest.mark.parametrize("name", list(load_catalog()))
def test_every_entry_has_source_and_fields(name):
    entry = load_catalog()[name]
    assert len(entry["source"]) > 20
    for field in REQUIRED_FIELDS:
        assert field in entry, f"{name} lacks {field}"
        if entry[field] is None:  # a null is allowed only with a stated reason
            assert field in entry.get("missing", {}), f"{name}: {field} is null without a reason"
    assert any(entry.get(f"{p}_tflops") for p in ("bf16", "fp16")), f"{name} has no 16-bit peak"
    for p in PRECISIONS:
        v = entry.get(f"{p}_tflops")
        assert v is None or 0 < v < 20000


@pytest.mark.parametrize("name", [n for n, e in load_catalog().items() if e.get("fp8_tflops")])
def test_fp8_is_twice_bf16_dense(name):
    # A sparse figure slipped in for one precision but not the other would break this.
    e = load_catalog()[name]
    assert e["fp8_tflops"] == pytest.approx(2 * e["bf16_tflops"], rel=0.01)


def test_dense_not_sparse_figures():
    # NVIDIA sheets print 1,979 (H100 bf16) and 624 (A100 bf16) with sparsity: we store half.
    assert get_accelerator("H100-SXM5-80GB").peak_flops("bf16") == 989e12
    assert get_accelerator("A100-SXM4-80GB").peak_flops("bf16") == 312e12
    assert get_accelerator("B200-HGX").peak_flops("bf16") == 2250e12


@pytest.mark.parametrize(
    "device, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM5-80GB"),
        ("NVIDIA H100 PCIe", "H100-PCIe-80GB"),
        ("NVIDIA H200", "H200-SXM-141GB"),
        ("NVIDIA H800", "H800-SXM5-80GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
        ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
        ("NVIDIA A800-SXM4-80GB", "A800-SXM4-80GB"),
        ("NVIDIA B200", "B200-HGX"),
        ("NVIDIA GB200", "GB200"),
        ("Tesla V100-SXM2-32GB", "V100-SXM2-32GB"),
        ("AMD Instinct MI300X", "MI300X"),
    ],
)
def test_device_name_aliases(device, expected):
    assert match_device_name(device).name == expected


def test_catalog_peak_keeps_train_api():
    peak = catalog_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert peak.flops == 989e12 and "catalog:H100-SXM5-80GB" in peak.source
    assert catalog_peak("NVIDIA A100-SXM4-80GB", "fp32").flops == 156e12  # TF32 fallback
    assert catalog_peak("Some Unknown GPU", "bf16") is None
    assert catalog_peak("Tesla V100-SXM2-32GB", "bf16") is None  # Volta has no bf16
    # ROCm shows an MI250X as two devices: each gets half the package peak
    assert catalog_peak("AMD Instinct MI250X", "bf16").flops == pytest.approx(383e12 / 2)


def test_get_accelerator_case_insensitive_and_error_lists_names():
    assert get_accelerator("h100-sxm5-80gb").name == "H100-SXM5-80GB"
    assert get_accelerator("tpu-V5P").name == "TPU-v5p"
    with pytest.raises(ValueError) as e:
        get_accelerator("H1000")
    for name in REQUIRED_ACCELERATORS:
        assert name in str(e.value)


def test_missing_precision_names_available_ones():
    with pytest.raises(ValueError, match="available: fp16, fp32"):
        get_accelerator("V100-SXM2-32GB").peak_flops("bf16")


# --- estimate v2: matmul ceilings, scale-out network, node size ---------------------------------

NEW_ACCELERATORS = ["TPU-v3", "TPU-v6e"]


def test_new_tpu_entries():
    catalog = load_catalog()
    for name in NEW_ACCELERATORS:
        assert name in catalog
    v3, v6e = get_accelerator("TPU-v3"), get_accelerator("TPU-v6e")
    assert v3.peak_flops("bf16") == 123e12 and v3.get("memory_bw_gbs") == 900
    assert v3.node_size() == 1024
    assert v6e.peak_flops("bf16") == 918e12 and v6e.get("memory_gb") == 32
    assert v6e.get("interconnect_gbs") == 800 and v6e.network_gbs() == 400
    assert v6e.node_size() == 256


@pytest.mark.parametrize("name", list(load_catalog()))
def test_matmul_ceiling_network_and_node_have_sources(name):
    entry = load_catalog()[name]
    ceiling = entry["matmul_ceiling"]
    if ceiling is None:
        assert len(entry["missing"]["matmul_ceiling"]) > 10
    else:
        assert len(ceiling["source"]) > 20
        figures = {k: v for k, v in ceiling.items() if k != "source"}
        assert figures, f"{name}: matmul_ceiling without a figure"
        for key, value in figures.items():
            assert key in PRECISIONS and key not in ("tf32", "fp32")
            assert entry.get(f"{key}_tflops"), f"{name}: ceiling for {key} but no {key} peak"
            assert 0.3 < value <= 1, f"{name}: {key} ceiling {value}"
    assert len(entry["network_source"]) > 20
    if entry["network_gbs"] is not None:
        assert 1 <= entry["network_gbs"] <= 2000
    assert isinstance(entry["node_size"], int) and 1 <= entry["node_size"] <= 10000


def test_matmul_ceiling_per_precision():
    h100 = get_accelerator("H100-SXM5-80GB")
    assert h100.matmul_ceiling("bf16") == pytest.approx(794.5 / 989, abs=0.001)
    assert h100.matmul_ceiling("fp8") == pytest.approx(1402.6 / 1979, abs=0.001)
    assert h100.matmul_ceiling("fp16") == h100.matmul_ceiling("bf16")  # no fp16 row: bf16's
    assert h100.matmul_ceiling("bfloat16") == h100.matmul_ceiling("bf16")  # any spelling
    assert h100.matmul_ceiling("tf32") is None and h100.matmul_ceiling("fp32") is None
    assert get_accelerator("A100-SXM4-80GB").matmul_ceiling("fp8") is None  # not measured
    assert get_accelerator("V100-SXM2-32GB").matmul_ceiling("fp16") is None
    # same silicon reuses the measured part's figure
    assert get_accelerator("H800-SXM5-80GB").matmul_ceiling("fp8") == h100.matmul_ceiling("fp8")
    assert "same silicon" in get_accelerator("A800-SXM4-80GB").get("matmul_ceiling")["source"]
    # ceiling x catalog peak reproduces the measured MAMF figure
    mi300x = get_accelerator("MI300X")
    achievable = mi300x.matmul_ceiling("bf16") * mi300x.peak_flops("bf16")
    assert achievable == pytest.approx(668.4e12, rel=0.002)
    with pytest.raises(ValueError, match="unknown precision"):
        h100.matmul_ceiling("int4")


def test_network_and_node_size():
    assert get_accelerator("H100-SXM5-80GB").network_gbs() == 50
    assert get_accelerator("A100-SXM4-80GB").network_gbs() == 25
    assert get_accelerator("H800-SXM5-80GB").network_gbs() == 50  # DeepSeek-V3: IB 50 GB/s
    assert get_accelerator("V100-SXM2-32GB").network_gbs() == 6.25
    assert get_accelerator("GB200").node_size() == 72
    assert get_accelerator("H100-SXM5-80GB").node_size() == 8
    assert get_accelerator("TPU-v5p").node_size() == 8960


def test_missing_network_or_node_raises_naming_entry():
    from estimate.hardware import Accelerator

    acc = Accelerator("Foo-1", {"missing": {"network_gbs": "no sheet"}})
    with pytest.raises(ValueError, match="Foo-1.*no sheet"):
        acc.network_gbs()
    with pytest.raises(ValueError, match="Foo-1 has no node_size"):
        acc.node_size()
    assert acc.matmul_ceiling("bf16") is None

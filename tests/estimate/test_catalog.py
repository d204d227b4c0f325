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

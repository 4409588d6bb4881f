"""bertkern.testing: the 2x-of-eager rule passes what it should and fails, with the numbers, what it should not."""
import pytest
import torch

from bertkern.testing import FLOORS, assert_close_2x, check_2x


def gelu_case(dtype=torch.bfloat16):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.nn.functional.gelu(x.double()), torch.nn.functional.gelu(x)


def test_eager_passes_and_a_worse_result_fails_with_numbers():
    ref64, eager = gelu_case()
    assert_close_2x(eager, ref64, eager)
    worse = (eager.float() * 1.05).bfloat16()
    check = check_2x(worse, ref64, eager, "y")
    assert not check.ok and check.err > check.tol == pytest.approx(2 * check.eager_err + FLOORS["op"][torch.bfloat16])
    with pytest.raises(AssertionError, match=r"y: max error .* > tol .* \(2 x eager.s"):
        assert_close_2x(worse, ref64, eager, "y")


def test_floor_lets_exact_eager_through_but_not_more():
    ref64 = torch.ones(8, dtype=torch.float64)
    eager = ref64.float()  # exact: eager's error is 0, only the floor is left
    assert check_2x(eager + 0.5e-6, ref64, eager).ok
    assert not check_2x(eager + 4e-6, ref64, eager).ok
    assert check_2x(eager + 4e-6, ref64, eager, floor="model").ok  # whole-model floor: 1e-5
    assert not check_2x(eager * 0 + 3.0 + 2e-6, ref64 * 3, eager * 3).ok
    assert check_2x(eager * 0 + 3.0 + 2e-6, ref64 * 3, eager * 3, scale_floor=True).ok  # floor x max(1, |ref|)


def test_nan_shape_dtype_and_reference_nan_never_pass():
    ref64, eager = gelu_case(torch.float32)
    nan = eager.clone()
    nan[3, 3] = float("nan")
    assert "NaN in the output" in check_2x(nan, ref64, eager).reason
    assert "NaN in the float64 reference" in check_2x(eager, ref64.clone().fill_(float("nan")), eager).reason
    assert "!= eager's" in check_2x(eager[:3], ref64, eager).reason
    assert "!= eager's" in check_2x(eager.double(), ref64, eager).reason


def test_sequences_are_judged_together():
    ref64, eager = gelu_case(torch.float32)
    both = check_2x([eager, eager + 1], [ref64, ref64], [eager, eager])
    assert not both.ok and both.err == pytest.approx(1, abs=1e-3)
    assert check_2x([eager, eager], [ref64, ref64], [eager, eager]).to_dict()["vs_eager"] == 0

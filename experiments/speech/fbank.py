"""Kaldi-style log-mel filterbank features in plain PyTorch (what ``compute-fbank-feats`` computes).

Frames of 25 ms every 10 ms (``snip_edges``: only whole frames, ``1 + (n - 400) // 160`` at
16 kHz), each with its mean removed (remove DC), pre-emphasised (coefficient 0.97, the first
sample against itself), multiplied by the Povey window ((0.5 - 0.5 cos(2 pi n / (N - 1)))^0.85),
zero-padded to a power of two, turned into a power spectrum, and weighted by triangular mel
filters (mel = 1127 ln(1 + f / 700), 20 Hz to Nyquist, equally spaced in mel, on the FFT bins
below Nyquist); the output is the natural log, floored at float32's epsilon. No dither, no
energy column. Samples are expected in 16-bit units (-32768 .. 32767), as Kaldi reads WAV
files; :func:`fbank` of float audio in [-1, 1) should be given ``waveform * 32768``.

tests/experiments/test_speech.py checks this against kaldi-native-fbank (with dither 0).

    feats = fbank(torch.from_numpy(samples_int16).float())          # (frames, 80) float32
"""

from __future__ import annotations

import functools
import math

import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPSILON = torch.finfo(torch.float32).eps  # Kaldi's log floor (FLT_EPSILON)


def mel_scale(freq: torch.Tensor | float) -> torch.Tensor:
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_banks(num_bins: int, padded: int, sample_rate: int, low_freq: float = LOW_FREQ) -> torch.Tensor:
    """Triangular filters (num_bins, padded // 2 + 1); the Nyquist bin gets no weight, as in Kaldi."""
    nyquist = sample_rate / 2
    n_fft_bins = padded // 2
    mel_low, mel_high = mel_scale(low_freq), mel_scale(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * torch.arange(num_bins, dtype=torch.float64)[:, None]  # (num_bins, 1)
    center, right = left + delta, left + 2 * delta
    mel = mel_scale(torch.arange(n_fft_bins, dtype=torch.float64) * (sample_rate / padded))[None, :]  # (1, bins)
    rising = (mel - left) / (center - left)
    falling = (right - mel) / (right - center)
    weights = torch.where(mel <= center, rising, falling)
    weights = torch.where((mel > left) & (mel < right), weights, torch.zeros(()))
    return torch.nn.functional.pad(weights, (0, 1)).float()  # (num_bins, padded // 2 + 1)


@functools.lru_cache(maxsize=8)
def povey_window(length: int) -> torch.Tensor:
    n = torch.arange(length, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))).pow(0.85).float()


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def fbank(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Log-mel filterbank energies (frames, num_mel_bins) of a mono waveform (samples,) in 16-bit units."""
    if waveform.dim() != 1:
        raise ValueError(f"fbank: expected a mono waveform of shape (samples,), got {tuple(waveform.shape)}")
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    padded = 1 << (window - 1).bit_length()  # round_to_power_of_two
    n = num_frames(waveform.numel(), sample_rate)
    if n == 0:
        return torch.zeros(0, num_mel_bins)
    frames = waveform.float().unfold(0, window, shift)  # (T, window)
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC
    first = frames[:, :1] * (1 - PREEMPHASIS)
    frames = torch.cat([first, frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], dim=1)  # pre-emphasis
    frames = frames * povey_window(window)
    spectrum = torch.fft.rfft(frames, n=padded)  # (T, padded // 2 + 1)
    power = spectrum.real.square() + spectrum.imag.square()
    energies = power @ mel_banks(num_mel_bins, padded, sample_rate).T  # (T, num_mel_bins)
    return energies.clamp_min(EPSILON).log()

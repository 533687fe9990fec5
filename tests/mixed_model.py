"""Test networks shared by the core tests: a residual block (one shared ReLU module), BatchNorm,
conv -> flatten -> linear, and hand-written self-attention over tokens [B, T, F]."""

from __future__ import annotations

import math

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()  # shared by both activations: noise must go after the BatchNorms

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Attention(nn.Module):
    """Single-head self-attention (q/k/v/out by hand) plus a feature MLP, both residual."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, t):
        q, k, v = self.q(t), self.k(t), self.v(t)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        t = t + self.out(w @ v)
        return t + self.fc2(self.act(self.fc1(t)))


class Net(nn.Module):
    """Two inputs: an image [B,3,8,8] and a token sequence [B,T,D].

    image: stem conv-BN-ReLU -> ResBlock -> pool -> conv-ReLU -> flatten -> Linear-ReLU;
    tokens: self-attention + feature MLP; head on the concatenation of both summaries."""

    T, D = 4, 8

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_act = nn.ReLU()
        self.block = ResBlock(8)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.act3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 32)
        self.fc_act = nn.ReLU()
        self.attn = Attention(self.D)
        self.head = nn.Linear(32 + self.D, classes)

    def forward(self, img, tokens):
        x = self.stem_act(self.stem_bn(self.stem(img)))
        x = self.pool(self.block(x))
        x = self.fc_act(self.fc(self.flatten(self.act3(self.conv3(x)))))
        t = self.attn(tokens).mean(1)
        return self.head(torch.cat([x, t], dim=1))

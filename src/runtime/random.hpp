// The sampler's random numbers: xoshiro256** seeded through splitmix64, written out here (not std::mt19937 with a
// std:: distribution) because the standard distributions are implementation-defined, and a seed must give the same
// tokens with every standard library and on every platform.
#pragma once

#include <cstdint>

namespace dsv4 {

// splitmix64 (Steele, Lea, Flood 2014): turns one 64-bit seed into well-mixed words for a larger state.
class SplitMix64 {
 public:
  explicit constexpr SplitMix64(uint64_t seed) : state_(seed) {}

  constexpr uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

 private:
  uint64_t state_;
};

// xoshiro256** (Blackman, Vigna 2018): 256-bit state, period 2^256 - 1, fast and statistically strong.
class Xoshiro256 {
 public:
  explicit constexpr Xoshiro256(uint64_t seed) {
    SplitMix64 mixer(seed);
    // splitmix64 never yields four zero words in a row, so the state is never the all-zero fixed point.
    for (uint64_t& word : state_) word = mixer.next();
  }

  constexpr uint64_t next() {
    const uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits: every value is exactly k * 2^-53, so the result is bit-identical
  // everywhere (no rounding mode or library involved).
  constexpr double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  static constexpr uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

  uint64_t state_[4]{};
};

}  // namespace dsv4

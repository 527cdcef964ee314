// The GPU sampler's per-request state: what each request's logits processors need, kept in
// persistent device arrays indexed by a slot the runner gives a request for its whole life.
// A step uploads only which slot each logits row belongs to and the row's sampling step; a
// request's parameters, lists and masks go up once, when it joins (`slot_init`), and the
// penalty counts and recent output are updated by the step itself (`sample_commit`), so the
// state is right even for a step queued behind one whose tokens the host has not seen.
//
// rvllm_kernels::sampling_state mirrors these layouts (and its test checks the sizes).
#pragma once

#include <stdint.h>

// Capacities per slot; requests beyond them are refused at the edge with these numbers.
#define RVLLM_BIAS_CAP 1024       // logit_bias entries
#define RVLLM_STOP_CAP 1088       // EOS ids + stop_token_ids (at most 1024) masked by min_tokens
#define RVLLM_BAD_SEQS_CAP 128    // bad-word token sequences
#define RVLLM_BAD_TOKENS_CAP 4096 // their tokens together
#define RVLLM_HISTORY 32          // recent output tokens kept (the longest bad word)

// SlotParams::flags
#define RVLLM_SLOT_PENALTIES 1 // counts (and, with a repetition penalty, the prompt mask) valid
#define RVLLM_SLOT_ALLOWED 2   // allowed_token_ids: the allowed mask is valid
#define RVLLM_SLOT_BIAS 4      // logit_bias: n_bias sorted entries

struct SlotParams {          // 64 bytes
    float temperature;       // < 1e-5: greedy
    int32_t top_k;           // <= 0: off
    float top_p;             // 1: off
    float min_p;             // 0: off
    uint64_t seed;
    float repetition_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t min_tokens;
    int32_t flags;
    int32_t n_bias;
    int32_t n_stop;
    int32_t n_bad;           // bad-word sequences
    int32_t reserved[2];
};

struct BiasEntry {
    int32_t token;
    float value;
};

// Where the state lives: one device struct of pointers, passed to the kernels by address.
struct SamplingTables {
    SlotParams* params;       // [slots]
    uint16_t* counts;         // [slots, vocab] output count of each token (saturating)
    uint32_t* prompt_mask;    // [slots, words] bit set: the token is in the prompt
    uint32_t* allowed_mask;   // [slots, words] bit set: the token may be chosen
    BiasEntry* bias;          // [slots, RVLLM_BIAS_CAP], sorted by token
    int32_t* stops;           // [slots, RVLLM_STOP_CAP]
    int32_t* bad_tokens;      // [slots, RVLLM_BAD_TOKENS_CAP], the sequences one after another
    int32_t* bad_lens;        // [slots, RVLLM_BAD_SEQS_CAP]
    int32_t* history;         // [slots, RVLLM_HISTORY] ring of the latest output tokens
    int32_t* history_len;     // [slots] output tokens recorded so far
    int32_t vocab;
    int32_t words;            // ceil(vocab / 32)
};

// A joining request, as `slot_init` reads it from the upload: the parameters, then where its
// lists start in the upload's int32 data (each list's length is in the parameters, or
// n_prompt / n_allowed here).
struct SlotJoin {
    SlotParams params;        // 64 bytes
    int32_t slot;
    int32_t prompt_at, n_prompt;    // prompt ids (only with a repetition penalty)
    int32_t allowed_at, n_allowed;  // allowed ids
    int32_t bias_at;                // n_bias (token, value bits) pairs
    int32_t stops_at;               // n_stop ids
    int32_t bad_at;                 // n_bad lengths, then their tokens
};

"""qhfast's fused step in Triton: QHAdam and QHM over a chunk table of a bucket's tensors.

The GPU twin of ``cpu_kernel.c``, element for element the same arithmetic (the same order of
operations, the same one division, the same conversions and random bits), so under Triton's
interpreter it matches the C kernel bit for bit. Imported by ``kernels/triton.py`` at the first
fused step that uses it (``@triton.jit`` reads ``TRITON_INTERPRET`` then); that module builds
the tables and launches.

A launch reads everything from device memory: the bucket's tensors by address from ``table``
(one row per role, one column per tensor: parameter, gradient, first and second moment (QHM:
its buffer), the mode's extra tensor (fp32 master or 16-bit Kahan compensation), the two
normalizers, the size and the tensor's first element over the bucket), the work from
``chunks`` (tensor, first element: one program per chunk), each hyperparameter from a 0-d
tensor (the user's tensor hyperparameter, or one the launcher fills from a float), GradScaler's
``grad_scale`` and ``found_inf``, and the step's 64 random bits. So a launch makes no host read
and can be captured in a CUDA graph, and a changed tensor lr is seen at the next replay.

Constexpr flags pick the variant (one JIT each): ``REAL64`` (fp64 compute), ``PARAM`` (0: the
compute dtype, 1: bf16, 2: fp16), ``MODE`` (0, or for 16-bit parameters 1 master, 2 kahan,
3 stochastic, 4 nearest), ``STATE`` (1: bf16 moments; 2: 8-bit codes with an fp32 scale per
256 elements, the table's scale rows, decoded and encoded through the code maps passed as
``maps``, ``qhfast/_quantize.py``), ``COUNTER64``, ``DECAY`` (0 none, 1 coupled,
2 decoupled), ``MAXIMIZE``, ``HAS_SCALE``, ``HAS_FOUND_INF``.

With 8-bit moments a loop pass is a (BLOCK / 256, 256) block, one row per scale, masked at a
tensor's end: a row's new scale is the largest magnitude of its elements (NaN if one is),
taken on their fp32 bits as the C kernel does, and 2^-126 where that is smaller but nonzero;
the elements are multiplied by its inverse (``_quantize._inverse``), not divided by it.

16-bit values are read and written as their bits (uint16) and converted in integer arithmetic
(torch's round to nearest even and NaN; unbiased stochastic rounding), as the C kernel does:
no dependence on how a backend (or the interpreter, which truncates) rounds a cast. Division
and square root are the correctly rounded ``div_rn`` / ``sqrt_rn`` (Triton's plain ``/`` and
``sqrt`` are approximate on NVIDIA GPUs), and launches pass ``enable_fp_fusion=False`` (no
multiply-add contracted into an FMA), so every operation rounds as in IEEE arithmetic.
"""

import triton
import triton.language as tl

# table rows (constexpr: a jit function reads no other global)
(PARAMS, GRADS, FIRSTS, SECONDS, EXTRAS, WEIGHTS1, WEIGHTS2, SCALES1, SCALES2, SIZES,
 OFFSETS) = map(tl.constexpr, range(11))
ROWS = 11
#: elements per scale of 8-bit moments (qhfast/_quantize.py's BLOCK)
QBLOCK = tl.constexpr(256)


# ---- conversions ------------------------------------------------------------------------------

@triton.jit
def _bits_to_float(h, PARAM: tl.constexpr):
    """16-bit values (uint16 bits) to fp32, exactly: bf16 (PARAM 1) or fp16 (PARAM 2)."""
    if PARAM == 1:
        return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nearest_bits(x, PARAM: tl.constexpr):
    """fp32 to bf16/fp16 bits, round to nearest even; NaN as torch writes it."""
    u = x.to(tl.uint32, bitcast=True)
    magnitude = u & 0x7FFFFFFF
    if PARAM == 1:
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where(magnitude > 0x7F800000, 0x7FC0, rounded)
    else:
        a = tl.abs(x)
        # below 2^-14 (subnormal halves) adding 0.5 rounds to a multiple of 2^-24 (to even)
        small = (a + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000
        normal = ((magnitude + 0x0FFF + ((magnitude >> 13) & 1)) >> 13) - ((127 - 15) << 10)
        half = tl.where(a < 6.103515625e-05, small, normal)
        half = tl.where(half > 0x7C00, 0x7C00, half)
        half = tl.where(a != a, 0x7E00, half)
        bits = ((u >> 16) & 0x8000) | half
    return bits.to(tl.uint16)


@triton.jit
def _stochastic_bits(x, r, PARAM: tl.constexpr):
    """fp32 to bf16/fp16 bits, up or down at random with the probability that makes it
    unbiased (r: uniform random bits, the low 16 used for bf16, 13 for fp16); NaN stays NaN."""
    u = x.to(tl.uint32, bitcast=True)
    if PARAM == 1:
        rounded = (u + (r & 0xFFFF)) >> 16
        bits = tl.where(x != x, 0x7FC0, rounded)
    else:
        a = tl.abs(x)
        subnormal = a < 6.103515625e-05
        # subnormals: the grid position of a + 2^-14 sits where a normal's mantissa does
        shifted = tl.where(subnormal, (a + 6.103515625e-05).to(tl.uint32, bitcast=True),
                           u & 0x7FFFFFFF)
        half = ((shifted + (r & 0x1FFF)) >> 13) - ((127 - 15) << 10)
        half = half - tl.where(subnormal, 0x0400, 0)
        half = tl.where(half > 0x7C00, 0x7C00, half)
        half = tl.where(a != a, 0x7E00, half)
        bits = ((u >> 16) & 0x8000) | half
    return bits.to(tl.uint16)


@triton.jit
def _weyl_hash(x):
    """32 random bits of element x (uint32, already combined with the seed); see the C
    kernel's comment on why this is enough for unbiased rounding."""
    x = x * 0x9E3779B1
    return x ^ (x >> 16)


# ---- reading and writing a block of a chunk ------------------------------------------------

@triton.jit
def _base(table, row, t, n, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor t's pointer in ``row``, at the chunk's first element. ALIGNED: the launcher
    found every address 16-byte aligned, which lets the compiler use vector loads."""
    pointer = tl.load(table + row * n + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # (a hint on the pointer: on the integer address the compiler loses it)
        pointer = tl.multiple_of(pointer, 16)
    return pointer + start


@triton.jit
def _chunk_pointers(table, t, n, start, PARAM: tl.constexpr, MODE: tl.constexpr,
                    STATE: tl.constexpr, REAL64: tl.constexpr, ALIGNED: tl.constexpr):
    """The chunk's pointers: parameter, gradient, first and second moment (QHM: its buffer;
    an unused one points at address 0 and is never read), the mode's extra tensor. 16-bit
    values are read as their bits (uint16)."""
    real = tl.float64 if REAL64 else tl.float32
    value = tl.uint16 if PARAM != 0 else real
    if STATE == 2:
        state = tl.uint8
    elif STATE == 1:
        state = tl.uint16
    else:
        state = real
    extra = tl.float32 if MODE == 1 else tl.uint16
    # 8-bit moments' scales, at the chunk's first block (a chunk starts on one)
    return (_base(table, PARAMS, t, n, start, value, ALIGNED),
            _base(table, GRADS, t, n, start, value, ALIGNED),
            _base(table, FIRSTS, t, n, start, state, ALIGNED),
            _base(table, SECONDS, t, n, start, state, ALIGNED),
            _base(table, EXTRAS, t, n, start, extra, ALIGNED),
            _base(table, SCALES1, t, n, start // QBLOCK, tl.float32, False),
            _base(table, SCALES2, t, n, start // QBLOCK, tl.float32, False))


@triton.jit
def _load(pointer, index, mask, FORMAT: tl.constexpr):
    """A block in the compute dtype: FORMAT 0 the pointer's own dtype, 1 bf16 bits, 2 fp16
    bits (converted exactly)."""
    x = tl.load(pointer + index, mask=mask, other=0)
    if FORMAT != 0:
        x = _bits_to_float(x, FORMAT)
    return x


@triton.jit
def _load_state(pointer, scales, values, index, mask, STATE: tl.constexpr):
    """A block of moments in the compute dtype's terms: as stored (STATE 0), from bf16 bits
    (1), or 8-bit codes decoded (2: the code's value times its row's scale, in fp32)."""
    if STATE == 2:
        codes = tl.load(pointer + index, mask=mask, other=0)
        scale = tl.load(scales + index // QBLOCK, mask=mask, other=0.0)
        return tl.load(values + codes.to(tl.int32)) * scale
    else:
        return _load(pointer, index, mask, STATE)


@triton.jit
def _store_state(pointer, scales, binade, index, mask, x, r, STATE: tl.constexpr,
                 SIGNED: tl.constexpr, LAST: tl.constexpr):
    """A moment written back: in the compute dtype, bf16 with stochastic rounding (r: the
    low 16 bits), or 8-bit codes over each row's new scale (:func:`_encode`)."""
    if STATE == 2:
        _encode(pointer, scales, binade, index, mask, x.to(tl.float32), r, SIGNED, LAST)
    elif STATE == 1:
        tl.store(pointer + index, _stochastic_bits(x.to(tl.float32), r, 1), mask=mask)
    else:
        tl.store(pointer + index, x, mask=mask)


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _encode(codes, scales, binade, index, mask, x, r, SIGNED: tl.constexpr,
            LAST: tl.constexpr):
    """A (rows, 256) block of fp32 moments as codes and one scale per row, the C kernel's
    ``encode`` operation for operation (see ``_quantize.CodeMap``): up where the share of the
    gap covered and the draw (the low 16 bits of r, over 2^16) add up to 1 or more.
    ``binade``: the map's steps' fp32 bits with the first code in the low 8 bits, by binade
    index (LAST + 1 of them); below the smallest binade a value's position is
    y · 2^(LAST - 1), exact."""
    x = tl.where(mask, x, 0.0)
    # (core builtins and our own jit functions only: triton.language's jit-defined ones, such
    # as tl.max, fail under an interpreter turned on after triton was imported)
    magnitudes = tl.reshape(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF,
                            (x.shape[0] // QBLOCK, QBLOCK))
    top = tl.reduce(magnitudes, 1, _larger).to(tl.float32, bitcast=True)
    smallest = tl.full((), 1 << 23, tl.int32).to(tl.float32, bitcast=True)  # 2^-126
    top = tl.where((top > 0.0) & (top < smallest), smallest, top)  # the scale (_quantize)
    positive = top > 0.0
    inverse = _divide(tl.full(top.shape, 1.0, tl.float32), tl.where(positive, top, 1.0))
    up = (inverse.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    inverse = tl.where(positive & (top * inverse < 1.0), up, inverse)  # _quantize._inverse
    scale = tl.reshape(tl.broadcast_to(tl.expand_dims(top, 1), magnitudes.shape), x.shape)
    y = tl.abs(x * tl.reshape(tl.broadcast_to(tl.expand_dims(inverse, 1), magnitudes.shape),
                              x.shape))
    bits = y.to(tl.uint32, bitcast=True)
    at = 127 - (bits >> 23).to(tl.int32)
    at = tl.minimum(tl.maximum(at, 0), LAST)
    entry = tl.load(binade + at)
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # in [1, 2)
    steps = (entry & -256).to(tl.float32, bitcast=True)
    below = tl.full((), (LAST - 1 + 127) << 23, tl.int32).to(tl.float32, bitcast=True)
    position = tl.where(at == LAST, y * below, (mantissa - 1.0) * steps)
    draw = (r & 0xFFFF).to(tl.float32) * 0.0000152587890625  # 2^-16
    code = (entry & 0xFF) + tl.floor(position + draw).to(tl.int32)
    code = tl.where(y != y, 0, code)
    if SIGNED:
        code = tl.where((x < 0.0) & (code > 0), code + 127, code)
    tl.store(codes + index, code.to(tl.uint8), mask=mask)
    tl.store(scales + index // QBLOCK, scale, mask=mask & (index % QBLOCK == 0))


@triton.jit
def _load_theta(param, extra, index, mask, PARAM: tl.constexpr, MODE: tl.constexpr):
    """The parameter's working value: itself, its fp32 master, or θ + c (exact in fp32)."""
    if MODE == 1:
        theta = tl.load(extra + index, mask=mask, other=0.0)
    else:
        theta = _load(param, index, mask, PARAM)
        if MODE == 2:
            theta = theta + _load(extra, index, mask, PARAM)
    return theta


@triton.jit
def _store_theta(param, extra, index, mask, theta, r, PARAM: tl.constexpr, MODE: tl.constexpr):
    """The updated working value written as MODE says (r: random bits, the upper 16 used)."""
    if MODE == 0:
        tl.store(param + index, theta, mask=mask)
    elif MODE == 1:
        tl.store(extra + index, theta, mask=mask)
        tl.store(param + index, _nearest_bits(theta, PARAM), mask=mask)
    elif MODE == 2:  # c keeps what rounding θ to nearest lost, itself rounded at random
        nearest = _nearest_bits(theta, PARAM)
        tl.store(param + index, nearest, mask=mask)
        residual = theta - _bits_to_float(nearest, PARAM)
        tl.store(extra + index, _stochastic_bits(residual, r >> 16, PARAM), mask=mask)
    elif MODE == 3:
        tl.store(param + index, _stochastic_bits(theta, r >> 16, PARAM), mask=mask)
    else:
        tl.store(param + index, _nearest_bits(theta, PARAM), mask=mask)


@triton.jit
def _divide(a, b):
    """a / b correctly rounded: ``div_rn`` for fp32 (Triton's ``/`` is approximate there on
    NVIDIA GPUs), ``/`` for fp64 (always correctly rounded)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _sqrt(x):
    """Correctly rounded square root (``sqrt_rn`` is fp32 only; fp64's ``sqrt`` is exact)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _hyper(pointer):
    """A hyperparameter from device memory, in fp64 (as the C kernel takes it)."""
    return tl.load(pointer).to(tl.float64)


@triton.jit
def _factor(grad_scale, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """What multiplies the gradient: ±1, divided by GradScaler's scale (fp64)."""
    factor = tl.full((), -1.0 if MAXIMIZE else 1.0, tl.float64)
    if HAS_SCALE:
        factor = factor / _hyper(grad_scale)
    return factor


@triton.jit
def _kept(found_inf, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """Whether the step is taken (found_inf zero), as a block-wide mask: the one value read
    at every lane (a 0-d comparison would not combine with a block in Triton's interpreter)."""
    if HAS_FOUND_INF:
        return tl.load(found_inf + tl.full([BLOCK], 0, tl.int32)) == 0
    else:
        return tl.full([BLOCK], 1, tl.int1)


@triton.jit
def _seeds(seeds):
    """The step's two 32-bit seeds from its 64 random bits."""
    bits = tl.load(seeds)
    return bits.to(tl.uint32), (bits >> 32).to(tl.uint32)


@triton.jit
def _lerp(start, end, weight, one_minus_weight, low_weight):
    """torch's lerp with a scalar weight (either form, as it picks)."""
    return tl.where(low_weight, start + weight * (end - start),
                    end - (end - start) * one_minus_weight)


@triton.jit
def _chunk(table, chunks, n_chunks, n, CHUNK: tl.constexpr, found_inf,
           HAS_FOUND_INF: tl.constexpr):
    """This program's chunk: its tensor, first element and length (int32; 0 when found_inf
    is nonzero: a skipped step reads and writes nothing), and where its first element lies
    over the whole bucket (what the random bits hash)."""
    k = tl.program_id(0)
    t = tl.load(chunks + k)
    start = tl.load(chunks + n_chunks + k)
    stop = tl.minimum(tl.load(table + SIZES * n + t) - start, CHUNK).to(tl.int32)
    if HAS_FOUND_INF:
        stop = tl.where(tl.load(found_inf) == 0, stop, 0)
    if CHUNK % 16 == 0:
        start = tl.multiple_of(start, 16)
    return t, start, stop, tl.load(table + OFFSETS * n + t) + start


@triton.jit
def _program(table, chunks, n_chunks, n, found_inf, seeds, PARAM: tl.constexpr,
             MODE: tl.constexpr, STATE: tl.constexpr, REAL64: tl.constexpr,
             ALIGNED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr):
    """What both kernels start a program with: its chunk (:func:`_chunk`), the chunk's
    pointers (:func:`_chunk_pointers`: parameter, gradient, moments, extra, the moments'
    scales) and the step's two seeds."""
    t, start, stop, first_element = _chunk(table, chunks, n_chunks, n, CHUNK, found_inf,
                                           HAS_FOUND_INF)
    param, grad, first, second, extra, scales1, scales2 = _chunk_pointers(
        table, t, n, start, PARAM, MODE, STATE, REAL64, ALIGNED)
    seed, seed2 = _seeds(seeds)
    return (t, stop, first_element, param, grad, first, second, extra, scales1, scales2, seed,
            seed2)


@triton.jit
def _begin_block(param, grad, extra, index, mask, first_element, seed, decay, coupled, factor,
                 PARAM: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
                 NEEDS_RANDOM: tl.constexpr):
    """The start of every element's update (both optimizers), for a block of the chunk: its
    elements' indices over the bucket and their random bits, the working value θ (decayed
    first when the decay is decoupled) and the step's gradient d (scaled, the coupled decay
    added)."""
    element = (first_element + index).to(tl.uint32)
    if NEEDS_RANDOM:
        r = _weyl_hash(element ^ seed)
    else:
        r = element  # unused
    theta = _load_theta(param, extra, index, mask, PARAM, MODE)
    if DECAY == 2:
        theta = theta * decay
    d = _load(grad, index, mask, PARAM) * factor
    if DECAY == 1:
        d = d + coupled * theta
    return element, r, theta, d


# ---- the kernels ------------------------------------------------------------------------------

@triton.jit
def _advance(table, row, n, offsets, mask, keep, beta, COUNTER64: tl.constexpr):
    if COUNTER64:
        pointers = tl.load(table + row * n + offsets, mask=mask, other=0).to(
            tl.pointer_type(tl.float64))
    else:
        pointers = tl.load(table + row * n + offsets, mask=mask, other=0).to(
            tl.pointer_type(tl.float32))
    w = tl.load(pointers, mask=mask, other=0.0)
    w = w * _hyper(beta).to(w.dtype)
    w = w + 1.0
    tl.store(pointers, w, mask=keep)


@triton.jit
def advance_normalizers(table, n, beta1, beta2, found_inf, COUNTER64: tl.constexpr,
                        HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """QHAdam's normalizers of every tensor, w ← 1 + βw in the counters' dtype (as the C
    kernel); unchanged where found_inf is nonzero. Runs before :func:`qhadam`."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    keep = mask & _kept(found_inf, HAS_FOUND_INF, BLOCK)
    _advance(table, WEIGHTS1, n, offsets, mask, keep, beta1, COUNTER64)
    _advance(table, WEIGHTS2, n, offsets, mask, keep, beta2, COUNTER64)


@triton.jit
def _qhadam_block(param, grad, first, second, extra, scales1, scales2, signed_values,
                  signed_binade, nonnegative_values, nonnegative_binade, index, mask,
                  first_element, seed, seed2, f1, one_minus_f1, low_weight, f2, keep2, decay,
                  coupled, factor, nu2_is_one, nu2, one_minus_nu2, m_scale, d_scale, first_term,
                  both_terms, eps, PARAM: tl.constexpr, MODE: tl.constexpr, STATE: tl.constexpr,
                  DECAY: tl.constexpr, NEEDS_RANDOM: tl.constexpr, SIGNED_LAST: tl.constexpr,
                  NONNEGATIVE_LAST: tl.constexpr):
    element, r, theta, d = _begin_block(param, grad, extra, index, mask, first_element, seed,
                                        decay, coupled, factor, PARAM, MODE, DECAY,
                                        NEEDS_RANDOM)
    m = _load_state(first, scales1, signed_values, index, mask, STATE).to(theta.dtype)
    m = _lerp(m, d, f1, one_minus_f1, low_weight)
    v = _load_state(second, scales2, nonnegative_values, index, mask, STATE).to(theta.dtype)
    v = v * keep2 + f2 * d * d
    den = tl.where(nu2_is_one, v, v * nu2 + one_minus_nu2 * d * d)
    den = _sqrt(den) + eps
    # one division: (m_scale·m + d_scale·d)/den, a term whose ν drops it left out
    step = tl.where(first_term, m_scale * m, d_scale * d)
    step = tl.where(both_terms, step + d_scale * d, step)
    theta = theta + _divide(step, den)
    _store_state(first, scales1, signed_binade, index, mask, m, r, STATE, True, SIGNED_LAST)
    _store_state(second, scales2, nonnegative_binade, index, mask, v, r >> 16, STATE, False,
                 NONNEGATIVE_LAST)
    if STATE != 0 and NEEDS_RANDOM:  # a third rounding: independent bits
        r = (element ^ seed2) * 0x9E3779B1
    _store_theta(param, extra, index, mask, theta, r, PARAM, MODE)


@triton.jit
def qhadam(table, chunks, n_chunks, n, lr, nu1, nu2, eps, weight_decay, grad_scale, found_inf,
           seeds, signed_values, signed_binade, nonnegative_values, nonnegative_binade,
           REAL64: tl.constexpr, PARAM: tl.constexpr, MODE: tl.constexpr,
           STATE: tl.constexpr, COUNTER64: tl.constexpr, DECAY: tl.constexpr,
           MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
           NEEDS_RANDOM: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
           BLOCK: tl.constexpr, SIGNED_LAST: tl.constexpr, NONNEGATIVE_LAST: tl.constexpr):
    """One chunk of QHAdam (the normalizers already advanced):

    d = g·factor (+ λθ, coupled);  θ ← (1 - αλ)θ first (decoupled)
    m ← lerp(m, d, 1/w1);  v ← v(1 - 1/w2) + (1/w2)d²
    θ ← θ + ((-αν1)m + (-α(1 - ν1))d) / (sqrt(ν2 v + (1 - ν2)d²) + ε)

    Blocks of 16·k elements take unmasked-width (vector) accesses; the last few elements of
    a tensor, if any, one masked block (8-bit moments: masked (rows, 256) blocks throughout).
    ``signed_values`` to ``nonnegative_binade``: the code maps' tables (values and packed
    binades, signed then non-negative; any tensor where STATE is not 2), SIGNED_LAST and
    NONNEGATIVE_LAST their last binade indices (binades + 1).
    """
    t, stop, first_element, param, grad, first, second, extra, scales1, scales2, seed, seed2 = (
        _program(table, chunks, n_chunks, n, found_inf, seeds, PARAM, MODE, STATE, REAL64,
                 ALIGNED, HAS_FOUND_INF, CHUNK))

    real = tl.float64 if REAL64 else tl.float32

    # the per-tensor and per-call scalars, computed in fp64 and rounded once (as the C kernel)
    counter = tl.float64 if COUNTER64 else tl.float32
    w1 = tl.load(_base(table, WEIGHTS1, t, n, 0, counter, False)).to(tl.float64)
    w2 = tl.load(_base(table, WEIGHTS2, t, n, 0, counter, False)).to(tl.float64)
    fraction1 = tl.full((), 1.0, tl.float64) / w1
    fraction2 = tl.full((), 1.0, tl.float64) / w2
    f1 = fraction1.to(real)
    f2 = fraction2.to(real)
    lr_ = _hyper(lr)
    nu1_ = _hyper(nu1)
    nu2_ = _hyper(nu2)
    wd = _hyper(weight_decay)
    factor = _factor(grad_scale, MAXIMIZE, HAS_SCALE).to(real)
    scalars = (f1, 1.0 - f1, tl.abs(f1) < 0.5, f2, (1.0 - fraction2).to(real),
               (1.0 - lr_ * wd).to(real), wd.to(real), factor, nu2_ == 1.0, nu2_.to(real),
               (1.0 - nu2_).to(real), (-lr_ * nu1_).to(real), (-lr_ * (1.0 - nu1_)).to(real),
               nu1_ != 0.0, (nu1_ != 0.0) & (nu1_ != 1.0), _hyper(eps).to(real))

    tensors = (param, grad, first, second, extra, scales1, scales2, signed_values,
               signed_binade, nonnegative_values, nonnegative_binade)
    full = stop // 16 * 16
    if STATE == 2:  # whole (rows, 256) blocks: a tensor's last block masked at its end
        for lo in range(0, CHUNK, BLOCK):
            index = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
            if lo + BLOCK <= full:
                _qhadam_block(*tensors, index, index < full, first_element, seed, seed2,
                              *scalars, PARAM, MODE, STATE, DECAY, NEEDS_RANDOM,
                              SIGNED_LAST, NONNEGATIVE_LAST)
            elif lo < stop:
                _qhadam_block(*tensors, index, index < stop, first_element, seed, seed2,
                              *scalars, PARAM, MODE, STATE, DECAY, NEEDS_RANDOM,
                              SIGNED_LAST, NONNEGATIVE_LAST)
    else:
        for lo in range(0, CHUNK, BLOCK):  # (constant bounds: older interpreters need them)
            if lo < full:
                index = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
                _qhadam_block(*tensors, index, index < full, first_element, seed, seed2,
                              *scalars, PARAM, MODE, STATE, DECAY, NEEDS_RANDOM,
                              SIGNED_LAST, NONNEGATIVE_LAST)
        if full < stop:
            index = full + tl.arange(0, BLOCK)
            _qhadam_block(*tensors, index, index < stop, first_element, seed, seed2, *scalars,
                          PARAM, MODE, STATE, DECAY, NEEDS_RANDOM, SIGNED_LAST, NONNEGATIVE_LAST)


@triton.jit
def _qhm_block(param, grad, buffer, extra, scales, values, binade, index, mask, first_element,
               seed, weight, one_minus_weight, low_weight, decay, coupled, factor, b_scale,
               d_scale, first_term, grad_term, PARAM: tl.constexpr, MODE: tl.constexpr,
               STATE: tl.constexpr, DECAY: tl.constexpr, NEEDS_RANDOM: tl.constexpr,
               LAST: tl.constexpr):
    element, r, theta, d = _begin_block(param, grad, extra, index, mask, first_element, seed,
                                        decay, coupled, factor, PARAM, MODE, DECAY,
                                        NEEDS_RANDOM)
    b = _load_state(buffer, scales, values, index, mask, STATE).to(theta.dtype)
    b = _lerp(b, d, weight, one_minus_weight, low_weight)
    theta = tl.where(first_term, theta + b_scale * b, theta)
    theta = tl.where(grad_term, theta + d_scale * d, theta)
    _store_state(buffer, scales, binade, index, mask, b, r, STATE, True, LAST)
    _store_theta(param, extra, index, mask, theta, r, PARAM, MODE)


@triton.jit
def qhm(table, chunks, n_chunks, n, lr, momentum, nu, weight_decay, grad_scale, found_inf,
        seeds, signed_values, signed_binade, nonnegative_values, nonnegative_binade,
        REAL64: tl.constexpr, PARAM: tl.constexpr, MODE: tl.constexpr,
        STATE: tl.constexpr, DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, NEEDS_RANDOM: tl.constexpr,
        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
        SIGNED_LAST: tl.constexpr, NONNEGATIVE_LAST: tl.constexpr):
    """One chunk of QHM:

    d = g·factor (+ λθ, "grad" decay);  θ ← (1 - αλ)θ first ("direct" decay)
    b ← lerp(b, d, 1 - β);  θ ← θ + (-αν)b + (-α(1 - ν))d
    """
    t, stop, first_element, param, grad, buffer, _, extra, scales, _, seed, _ = _program(
        table, chunks, n_chunks, n, found_inf, seeds, PARAM, MODE, STATE, REAL64, ALIGNED,
        HAS_FOUND_INF, CHUNK)
    real = tl.float64 if REAL64 else tl.float32

    lr_ = _hyper(lr)
    nu_ = _hyper(nu)
    wd = _hyper(weight_decay)
    weight = (1.0 - _hyper(momentum)).to(real)
    scalars = (weight, 1.0 - weight, tl.abs(weight) < 0.5, (1.0 - lr_ * wd).to(real),
               wd.to(real), _factor(grad_scale, MAXIMIZE, HAS_SCALE).to(real),
               (-lr_ * nu_).to(real), (-lr_ * (1.0 - nu_)).to(real), nu_ != 0.0, nu_ != 1.0)

    tensors = (param, grad, buffer, extra, scales, signed_values, signed_binade)
    full = stop // 16 * 16
    if STATE == 2:  # whole (rows, 256) blocks: a tensor's last block masked at its end
        for lo in range(0, CHUNK, BLOCK):
            index = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
            if lo + BLOCK <= full:
                _qhm_block(*tensors, index, index < full, first_element, seed, *scalars,
                           PARAM, MODE, STATE, DECAY, NEEDS_RANDOM, SIGNED_LAST)
            elif lo < stop:
                _qhm_block(*tensors, index, index < stop, first_element, seed, *scalars,
                           PARAM, MODE, STATE, DECAY, NEEDS_RANDOM, SIGNED_LAST)
    else:
        for lo in range(0, CHUNK, BLOCK):  # (constant bounds: older interpreters need them)
            if lo < full:
                index = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
                _qhm_block(*tensors, index, index < full, first_element, seed, *scalars,
                           PARAM, MODE, STATE, DECAY, NEEDS_RANDOM, SIGNED_LAST)
        if full < stop:
            index = full + tl.arange(0, BLOCK)
            _qhm_block(*tensors, index, index < stop, first_element, seed, *scalars, PARAM,
                       MODE, STATE, DECAY, NEEDS_RANDOM, SIGNED_LAST)

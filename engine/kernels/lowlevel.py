"""Numba intrinsics the numerical kernels need and Numba does not offer: software prefetch of a
matrix row or of one array element, float32 <-> uint32 bit casts of scalars, reads and writes of
weights stored as float32 or as bfloat16 bits (uint16), and pread(2) into an array.

A sampled layer's rows are read and updated in random order (the active neurons of a point, the
rows a batch touched), so every row starts with cache misses the hardware prefetcher cannot
foresee; asking for the next row while the current one is computed hides part of that latency (measured
in BENCHMARKS.md, "Why the defaults are what they are").
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

_CACHE_LINE = 64


def _emit_prefetch(builder, address, write=True):
    """Emit llvm.prefetch of the i8* address: rw = 1 (write) or 0 (read), locality = 3 (keep in all
    cache levels), cache type = 1 (data)."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
    )
    builder.call(fn, [address, i32(int(write)), i32(3), i32(1)])


@intrinsic
def prefetch_item(typingctx, vector, index):
    """Hint the CPU to fetch the cache line of vector[index] (a 1-D array) for writing; no effect on
    results, and no bounds check (pass a valid index)."""
    if not (isinstance(vector, types.Array) and vector.ndim == 1 and isinstance(index, types.Integer)):
        return None
    sig = types.void(vector, index)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [idx], wraparound=False)
        _emit_prefetch(builder, builder.bitcast(ptr, ir.IntType(8).as_pointer()))
        return context.get_dummy_value()

    return sig, codegen


def _row_prefetch(write):
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        row_index = context.cast(builder, args[1], signature.args[1], types.intp)
        start = cgutils.get_item_pointer(
            context, builder, aryty, ary, [row_index, ir.Constant(intp, 0)], wraparound=False
        )
        base = builder.bitcast(start, ir.IntType(8).as_pointer())
        row_bytes = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), row_bytes, ir.Constant(intp, _CACHE_LINE)) as (
            off,
            _,
        ):
            _emit_prefetch(builder, builder.gep(base, [off]), write)
        return context.get_dummy_value()

    return codegen


def _row_signature(matrix, row):
    if not (
        isinstance(matrix, types.Array) and matrix.ndim == 2 and matrix.layout == "C" and isinstance(row, types.Integer)
    ):
        return None
    return types.void(matrix, row)


@intrinsic
def prefetch_row(typingctx, matrix, row):
    """Hint the CPU to fetch every cache line of matrix[row] (a C-contiguous 2-D array) for writing;
    no effect on results, and no bounds check (pass a valid row)."""
    sig = _row_signature(matrix, row)
    return None if sig is None else (sig, _row_prefetch(True))


@intrinsic
def prefetch_row_read(typingctx, matrix, row):
    """prefetch_row for reading: the line may stay shared with other cores that read the row too."""
    sig = _row_signature(matrix, row)
    return None if sig is None else (sig, _row_prefetch(False))


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the unsigned integer `bits`."""
    if not (isinstance(bits, types.Integer) and not bits.signed):
        return None

    def codegen(context, builder, signature, args):
        low = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def float_bits(typingctx, x):
    """The bit pattern of the float32 x, as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def pread_into(typingctx, fd, out, start, count, offset):
    """pread(fd, &out[start], count * out.itemsize, offset): the bytes read, 0 at the end of the file
    or -1 on an error. out is a C-contiguous 1-D array; no bounds check (pass a range inside it).

    libc's pread is named in the object code and resolved when it is loaded, so kernels that call it
    can be cached (a ctypes function pointer could not: its address changes from process to process)."""
    if not (
        isinstance(out, types.Array)
        and out.ndim == 1
        and out.layout == "C"
        and all(isinstance(a, types.Integer) for a in (fd, start, count, offset))
    ):
        return None
    sig = types.int64(fd, out, start, count, offset)

    def codegen(context, builder, signature, args):
        fd_v, out_v, start_v, count_v, offset_v = args
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        array = context.make_array(signature.args[1])(context, builder, out_v)
        item = context.get_abi_sizeof(context.get_data_type(signature.args[1].dtype))
        first = builder.gep(array.data, [context.cast(builder, start_v, signature.args[2], types.int64)])
        nbytes = builder.mul(context.cast(builder, count_v, signature.args[3], types.int64), i64(item))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [ir.IntType(32), i8p, i64, i64]), "pread"
        )
        return builder.call(
            fn,
            [
                context.cast(builder, fd_v, signature.args[0], types.int32),
                builder.bitcast(first, i8p),
                nbytes,
                context.cast(builder, offset_v, signature.args[4], types.int64),
            ],
        )

    return sig, codegen


def weight_at(row, k):
    """row[k] as float32, for a weight row stored as float32 or as bfloat16 bits (uint16); kernels only.

    A bfloat16 is the top half of a float32, so widening is a shift: the dot-product loops that read
    rows this way still vectorise, and read half the bytes."""
    raise NotImplementedError("weight_at is compiled into kernels by Numba")


@overload(weight_at)
def _weight_at(row, k):
    if isinstance(row, types.Array) and row.dtype == types.uint16:
        return lambda row, k: float_from_bits(np.uint32(row[k]) << np.uint32(16))
    return lambda row, k: row[k]


@register_jitable
def rounding_noise(salt, k):
    """16 random bits (a uint32 < 2^16) for element k of an update keyed by salt (uint64, random): the top
    of salt + k * 2^32 / golden ratio, mod 2^32. Over a row's updates (a fresh salt each) every element's
    bits are uniform and independent; within one update they are evenly spread (a Weyl sequence), which
    costs one add per element, so the update loop stays a vector loop."""
    return np.uint32((salt + np.uint64(k) * np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF)) >> np.uint32(16)


def store_weight(row, k, value, salt):
    """row[k] = value (float32), rounded stochastically to bfloat16 when row holds bfloat16 bits; kernels only.

    Stochastic rounding keeps updates smaller than a bfloat16 step (1/128 of the weight) in
    expectation: rounding to nearest would drop every Adam step below half of one, and a weight
    that receives many small steps would stop moving. salt (uint64) keys the random bits, so a
    run is as reproducible as with float32 weights."""
    raise NotImplementedError("store_weight is compiled into kernels by Numba")


@overload(store_weight)
def _store_weight(row, k, value, salt):
    if isinstance(row, types.Array) and row.dtype == types.uint16:

        def store(row, k, value, salt):
            row[k] = np.uint16((float_bits(value) + rounding_noise(salt, k)) >> np.uint32(16))

        return store

    def store_float(row, k, value, salt):
        row[k] = value

    return store_float

"""The compiled record scanner of the notes stage: one pass over the bytes of a NOTEEVENTS block.

NOTEEVENTS.csv is 97% notes the stage drops, so the one thing every byte must go through is this
state machine (numba, no GIL): it follows CSV quoting, checks UTF-8 and the field count, rejects
NUL bytes, and records per record its ROW_ID, its byte span and its CATEGORY (as an index into a
small table of the distinct raw values). Inside quoted fields, which hold almost all bytes, it
skips eight bytes at a time while a word holds no quote, NUL or non-ASCII byte. extract_fields
then unquotes the wanted fields of the selected records straight into Arrow string buffers.

It only says *that* a block is malformed (a status code); the caller's slow strict pass then finds
the line and ROW_ID for the error message. A quote inside an unquoted field is an ordinary
character, as for Python's csv module and Arrow.
"""

from __future__ import annotations

import atexit
import gc
import logging

import numpy as np
from numba import njit

log = logging.getLogger(__name__)

# numba's objects (types, LLVM modules) form cycles; the interpreter's last collections tear
# them down one by one at exit, 0.6-1 s measured, for memory the OS frees anyway. Frozen
# objects are left alone (Python never promises finalizers at exit).
atexit.register(gc.freeze)

# Status codes of scan_records.
DONE = 0  # reached `stop`, or the end of data where the rest is a partial record
FULL = 1  # stopped early (output arrays or category table full): call again from `consumed`
NUL_BYTE = 2
INVALID_UTF8 = 3
WRONG_FIELD_COUNT = 4
BAD_QUOTING = 5  # text after a closing quote, or a carriage return not followed by a newline
PROBLEMS = {NUL_BYTE: "NUL byte", INVALID_UTF8: "invalid UTF-8", WRONG_FIELD_COUNT: "wrong number of fields",
            BAD_QUOTING: "text after a closing quote"}

MAX_ROW_ID_DIGITS = 18  # fits int64

_QUOTE, _COMMA, _NEWLINE, _CR = 34, 44, 10, 13
_FIELD_START, _UNQUOTED, _QUOTED, _QUOTED_QUOTE, _LINE_END = 0, 1, 2, 3, 4
_ONES = np.uint64(0x0101010101010101)
_HIGH_BITS = np.uint64(0x8080808080808080)
_QUOTES = np.uint64(0x2222222222222222)


def _compiled(function):
    """numba's nogil compilation, cached on disk next to this module or in the user's cache folder.

    An install where neither is writable (a read-only image with no home) compiles once per
    process instead (5-7 s on the 2-core development machine).
    """
    try:
        return njit(nogil=True, cache=True)(function)
    except RuntimeError as err:  # numba: "cannot cache function ...: no locator available"
        log.debug("numba cache unavailable (%s); compiling in memory", err)
        return njit(nogil=True)(function)


@njit(inline="always")  # inlined into scan_records: a call per record costs a third of the scan
def _row_id(data, begin, end):
    """The integer in data[begin:end] (quotes around it allowed), or -1 if it is not one."""
    if end - begin >= 2 and data[begin] == _QUOTE and data[end - 1] == _QUOTE:
        begin += 1
        end -= 1
    if end <= begin or end - begin > MAX_ROW_ID_DIGITS:
        return -1
    value = 0
    for i in range(begin, end):
        digit = data[i] - 48
        if digit < 0 or digit > 9:
            return -1
        value = value * 10 + digit
    return value


@njit(inline="always")
def _category(data, begin, end, spans, n_spans):
    """Index of data[begin:end] in the table of distinct raw values `spans[:n_spans]` (start,
    length), adding it if new; -1 if it is new and the table is full."""
    length = end - begin
    for k in range(n_spans):
        if spans[k, 1] != length:
            continue
        start = spans[k, 0]
        same = True
        for j in range(length):
            if data[start + j] != data[begin + j]:
                same = False
                break
        if same:
            return k
    if n_spans == spans.shape[0]:
        return -1
    spans[n_spans, 0] = begin
    spans[n_spans, 1] = length
    return n_spans


@_compiled
def scan_records(data, words, begin, stop, n_columns, row_id_column, category_column,
                 row_ids, starts, ends, category_ids, category_spans):
    """Scan the records of data[begin:] (begin is a record boundary) up to the first record
    boundary at or after `stop`.

    `words` is data's first len(data) // 8 * 8 bytes viewed as uint64. Fills, per record,
    row_ids (-1 where not an integer), starts and ends (byte offsets, end after the newline) and
    category_ids (index into category_spans, rows (start, length) of distinct raw CATEGORY
    values). Returns (status, consumed, records, categories): `consumed` is the offset where
    scanning stopped, at a record boundary; a partial record at the end of data is left for the
    next block. Blank lines are skipped, as csv and Arrow do.
    """
    n = data.shape[0]
    n_words = words.shape[0]
    capacity = row_ids.shape[0]
    n_records = 0
    n_categories = 0
    state = _FIELD_START
    field = 0
    field_start = begin
    field_end = begin
    record_start = begin
    row_id = -1
    category = -1
    utf8_left = 0  # continuation bytes still expected, each within [utf8_low, utf8_high]
    utf8_low = 0x80
    utf8_high = 0xBF
    i = begin
    if begin >= stop:
        return DONE, begin, 0, 0
    while i < n:
        if state == _QUOTED and utf8_left == 0:
            # The fast path through quoted text: on to the next quote, NUL or non-ASCII byte, a
            # word of eight bytes at a time where aligned ("has a zero byte" bit trick).
            while i < n:
                if (i & 7) == 0 and (i >> 3) < n_words:
                    word = words[i >> 3]
                    quotes = word ^ _QUOTES
                    if not (((quotes - _ONES) & ~quotes) | ((word - _ONES) & ~word) | word) & _HIGH_BITS:
                        i += 8
                        continue
                c = data[i]
                if c == _QUOTE or c == 0 or c >= 0x80:
                    break
                i += 1
            if i >= n:
                break
        c = data[i]
        if utf8_left:
            if c < utf8_low or c > utf8_high:
                return INVALID_UTF8, record_start, n_records, n_categories
            utf8_left -= 1
            utf8_low = 0x80
            utf8_high = 0xBF
            i += 1
            continue
        if c >= 0x80:  # a lead byte; the limits exclude overlong forms, surrogates and > U+10FFFF
            if c < 0xC2 or c > 0xF4:
                return INVALID_UTF8, record_start, n_records, n_categories
            if c < 0xE0:
                utf8_left = 1
            elif c < 0xF0:
                utf8_left = 2
                utf8_low = 0xA0 if c == 0xE0 else 0x80
                utf8_high = 0x9F if c == 0xED else 0xBF
            else:
                utf8_left = 3
                utf8_low = 0x90 if c == 0xF0 else 0x80
                utf8_high = 0x8F if c == 0xF4 else 0xBF
            if state == _QUOTED_QUOTE or state == _LINE_END:
                return BAD_QUOTING, record_start, n_records, n_categories
            if state == _FIELD_START:
                state = _UNQUOTED
            i += 1
            continue
        if c == 0:
            return NUL_BYTE, record_start, n_records, n_categories
        delimiter = False
        newline = False
        if state == _QUOTED:
            if c == _QUOTE:
                state = _QUOTED_QUOTE
        elif state == _LINE_END:
            if c != _NEWLINE:
                return BAD_QUOTING, record_start, n_records, n_categories
            newline = True
        elif c == _COMMA:
            delimiter = True
            field_end = i
        elif c == _NEWLINE:
            newline = True
            field_end = i
        elif c == _CR:
            state = _LINE_END
            field_end = i
        elif state == _QUOTED_QUOTE:
            if c != _QUOTE:
                return BAD_QUOTING, record_start, n_records, n_categories
            state = _QUOTED  # an escaped quote
        elif state == _FIELD_START and c == _QUOTE:
            state = _QUOTED
        else:
            state = _UNQUOTED
        i += 1
        if not (delimiter or newline):
            continue
        if newline and field == 0 and field_end == record_start:  # a blank line
            state = _FIELD_START
            field_start = record_start = i
            continue
        if field == row_id_column:
            row_id = _row_id(data, field_start, field_end)
        if field == category_column:
            category = _category(data, field_start, field_end, category_spans, n_categories)
            if category < 0:  # the table is full: the next call starts a new one
                return FULL, record_start, n_records, n_categories
            n_categories = max(n_categories, category + 1)
        state = _FIELD_START
        field_start = i
        if delimiter:
            field += 1
            continue
        if field + 1 != n_columns:
            return WRONG_FIELD_COUNT, record_start, n_records, n_categories
        row_ids[n_records] = row_id
        starts[n_records] = record_start
        ends[n_records] = i
        category_ids[n_records] = category
        n_records += 1
        field = 0
        record_start = i
        if record_start >= stop:
            return DONE, record_start, n_records, n_categories
        if n_records == capacity:
            return FULL, record_start, n_records, n_categories
    return DONE, record_start, n_records, n_categories


@njit(inline="always")
def _next_quote(data, words, i, stop):
    """Index of the first quote in data[i:stop], or stop; eight bytes at a time where aligned."""
    n_words = words.shape[0]
    while i < stop:
        if (i & 7) == 0 and (i >> 3) < n_words and i + 8 <= stop:
            quotes = words[i >> 3] ^ _QUOTES
            if not ((quotes - _ONES) & ~quotes) & _HIGH_BITS:
                i += 8
                continue
        if data[i] == _QUOTE:
            return i
        i += 1
    return stop


@njit(inline="always")
def _field_spans(data, words, starts, ends, spans):
    """spans[r, f] = (begin, end) of field f of the record data[starts[r]:ends[r]], quotes
    included, line end excluded. The records must have passed scan_records."""
    for r in range(starts.shape[0]):
        i, end, field = starts[r], ends[r], 0
        while True:
            begin = i
            if data[i] == _QUOTE:  # a quoted field: on to its closing quote, past any "" inside
                i = _next_quote(data, words, i + 1, end)
                while data[i + 1] == _QUOTE:
                    i = _next_quote(data, words, i + 2, end)
                i += 1
            while data[i] != _COMMA and data[i] != _NEWLINE and data[i] != _CR:
                i += 1
            spans[r, field, 0] = begin
            spans[r, field, 1] = i
            if data[i] != _COMMA:
                break
            field += 1
            i += 1


@njit(inline="always")
def _copy(data, begin, end, values, position):
    """values[position:] = data[begin:end]; returns the new position. (A plain loop, which LLVM
    vectorises: numba's slice assignment costs seconds of compile time.)"""
    for k in range(end - begin):
        values[position + k] = data[begin + k]
    return position + end - begin


@_compiled
def extract_fields(data, words, starts, ends, n_columns, fields, offsets, values):
    """The fields `fields` (indices) of the records data[starts[r]:ends[r]], unquoted, as Arrow
    string arrays sharing `values`: column c's bytes are values[bases[c]:bases[c + 1]] and its
    offsets, relative to bases[c], are offsets[c]. Returns bases. The records must have passed
    scan_records, and `values` must hold them all."""
    spans = np.empty((starts.shape[0], n_columns, 2), np.int64)
    _field_spans(data, words, starts, ends, spans)
    bases = np.zeros(fields.shape[0] + 1, np.int64)
    for c in range(fields.shape[0]):
        column = fields[c]
        position = bases[c]
        offsets[c, 0] = 0
        for r in range(spans.shape[0]):
            begin, end = spans[r, column, 0], spans[r, column, 1]
            if end - begin < 2 or data[begin] != _QUOTE:  # unquoted: as it stands
                position = _copy(data, begin, end, values, position)
            else:  # runs up to each quote copied whole; "" inside the quotes stands for one quote
                begin += 1
                end -= 1
                while begin < end:
                    quote = _next_quote(data, words, begin, end)
                    position = _copy(data, begin, quote, values, position)
                    if quote < end:
                        values[position] = _QUOTE
                        position += 1
                    begin = quote + 2
            offsets[c, r + 1] = position - bases[c]
        bases[c + 1] = position
    return bases


def warm_up() -> None:
    """Compile every kernel now (or load it from numba's cache): a few seconds once per
    install, instead of inside the first run of the notes stage."""
    record = np.frombuffer(bytearray(b'1,"a""b"\n'), np.uint8)
    words = record[: len(record) // 8 * 8].view(np.uint64)
    one = np.ones(1, np.int64)
    scan_records(record, words, 0, len(record), 2, 0, 1, one.copy(), one.copy(), one.copy(),
                 np.ones(1, np.int32), np.ones((1, 2), np.int64))
    extract_fields(record, words, np.zeros(1, np.int64), np.full(1, len(record), np.int64), 2, one,
                   np.ones((1, 2), np.int32), np.ones(len(record), np.uint8))


if __name__ == "__main__":
    warm_up()

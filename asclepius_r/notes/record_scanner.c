/* The notes stage's record scanner: one pass over the bytes of a NOTEEVENTS block.
 *
 * NOTEEVENTS.csv is 97% notes the stage drops, so the one thing every byte must go through is this
 * state machine. It follows CSV quoting, checks UTF-8 and the field count, rejects NUL bytes, and
 * records per record its ROW_ID, its byte span and its CATEGORY (an index into a small table of the
 * distinct raw values). Inside quoted fields, which hold almost all bytes, it skips 32 bytes at a
 * time while they hold no quote, NUL or non-ASCII byte (GCC/Clang vector extensions: SSE2 on
 * x86-64, NEON on ARM, no instruction-set flags needed). extract_fields then unquotes the wanted
 * fields of chosen records straight into Arrow string buffers, and can hash one field's unquoted
 * value without copying it (to find duplicate notes).
 *
 * Loaded with ctypes by record_scanner.py, which compiles it on first use; ctypes releases the GIL
 * for the length of each call, so worker threads scan in parallel. It only says *that* a block is
 * malformed (a status code); the caller's slow strict pass finds the line and ROW_ID for the error
 * message. A quote inside an unquoted field is an ordinary character, as for Python's csv module.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Status codes; record_scanner.py mirrors them. */
enum { DONE = 0, FULL = 1, NUL_BYTE = 2, INVALID_UTF8 = 3, WRONG_FIELD_COUNT = 4, BAD_QUOTING = 5, NO_MEMORY = 6 };
enum { FIELD_START, UNQUOTED, QUOTED, QUOTED_QUOTE, LINE_END };
enum { QUOTE = '"', COMMA = ',', NEWLINE = '\n', CR = '\r' };
#define MAX_ROW_ID_DIGITS 18 /* fits int64 */

typedef uint8_t bytes16 __attribute__((vector_size(16)));
#define SPLAT(x) {x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}

/* Whether the 32 bytes at p hold no quote, NUL or non-ASCII byte (unaligned loads via memcpy). */
static inline int plain_text32(const uint8_t *p) {
    static const bytes16 quote = SPLAT(QUOTE), zero = SPLAT(0), high = SPLAT(0x80);
    bytes16 a, b;
    memcpy(&a, p, 16);
    memcpy(&b, p + 16, 16);
    bytes16 hits = (bytes16)((a == quote) | (a == zero) | (b == quote) | (b == zero)) | ((a | b) & high);
    uint64_t lanes[2];
    memcpy(lanes, &hits, 16);
    return (lanes[0] | lanes[1]) == 0;
}

/* The bytes that end a run of plain ASCII in an unquoted field: delimiters, line ends, NUL and
 * non-ASCII bytes (a quote is an ordinary character there). */
static const uint8_t ends_unquoted_run[256] = {
    [0] = 1, [COMMA] = 1, [NEWLINE] = 1, [CR] = 1,
    [0x80 ... 0xFF] = 1, /* GCC/Clang range designator */
};

/* The integer in data[begin:end] (quotes around it allowed), or -1 if it is not one. */
static inline int64_t parse_row_id(const uint8_t *data, int64_t begin, int64_t end) {
    if (end - begin >= 2 && data[begin] == QUOTE && data[end - 1] == QUOTE) {
        begin++;
        end--;
    }
    if (end <= begin || end - begin > MAX_ROW_ID_DIGITS) return -1;
    int64_t value = 0;
    for (int64_t i = begin; i < end; i++) {
        int digit = data[i] - '0';
        if (digit < 0 || digit > 9) return -1;
        value = value * 10 + digit;
    }
    return value;
}

/* Index of data[begin:end] in the table of distinct raw values spans[:n_spans] (start, length),
 * adding it if new; -1 if it is new and the table is full. */
static inline int64_t category_index(const uint8_t *data, int64_t begin, int64_t end, int64_t *spans,
                                     int64_t n_spans, int64_t max_spans) {
    int64_t length = end - begin;
    for (int64_t k = 0; k < n_spans; k++)
        if (spans[2 * k + 1] == length && memcmp(data + spans[2 * k], data + begin, (size_t)length) == 0) return k;
    if (n_spans == max_spans) return -1;
    spans[2 * n_spans] = begin;
    spans[2 * n_spans + 1] = length;
    return n_spans;
}

/* Scan the records of data[begin:n] (begin is a record boundary) up to the first record boundary
 * at or after `stop`.
 *
 * Fills, per record, row_ids (-1 where not an integer), starts and ends (byte offsets, end after
 * the newline) and category_ids (index into category_spans, rows (start, length) of the distinct
 * raw CATEGORY values). Writes (consumed, records, categories) into result and returns the status:
 * `consumed` is the offset where scanning stopped, at a record boundary; a partial record at the end
 * of data is left for the next block. Blank lines are skipped, as csv and Arrow do. */
int64_t scan_records(const uint8_t *data, int64_t n, int64_t begin, int64_t stop, int64_t n_columns,
                     int64_t row_id_column, int64_t category_column, int64_t *row_ids, int64_t *starts,
                     int64_t *ends, int32_t *category_ids, int64_t capacity, int64_t *category_spans,
                     int64_t max_categories, int64_t *result) {
    int64_t n_records = 0, n_categories = 0, field = 0, row_id = -1, category = -1;
    int64_t field_start = begin, field_end = begin, record_start = begin, i = begin;
    int state = FIELD_START, utf8_left = 0; /* continuation bytes still expected, each in [low, high] */
    uint8_t utf8_low = 0x80, utf8_high = 0xBF;
    int64_t status = DONE;
    if (begin >= stop) goto out;
    while (i < n) {
        if (utf8_left == 0) {
            if (state == QUOTED) { /* the fast path through quoted text */
                while (i + 32 <= n && plain_text32(data + i)) i += 32;
                while (i < n && data[i] != QUOTE && data[i] != 0 && data[i] < 0x80) i++;
                if (i >= n) break;
            } else if (state == UNQUOTED) { /* and through the short unquoted fields */
                while (i < n && !ends_unquoted_run[data[i]]) i++;
                if (i >= n) break;
            }
        }
        uint8_t c = data[i];
        if (utf8_left) {
            if (c < utf8_low || c > utf8_high) { status = INVALID_UTF8; goto out; }
            utf8_left--;
            utf8_low = 0x80;
            utf8_high = 0xBF;
            i++;
            continue;
        }
        if (c >= 0x80) { /* a lead byte; the limits exclude overlong forms, surrogates and > U+10FFFF */
            if (c < 0xC2 || c > 0xF4) { status = INVALID_UTF8; goto out; }
            if (c < 0xE0) {
                utf8_left = 1;
            } else if (c < 0xF0) {
                utf8_left = 2;
                utf8_low = c == 0xE0 ? 0xA0 : 0x80;
                utf8_high = c == 0xED ? 0x9F : 0xBF;
            } else {
                utf8_left = 3;
                utf8_low = c == 0xF0 ? 0x90 : 0x80;
                utf8_high = c == 0xF4 ? 0x8F : 0xBF;
            }
            if (state == QUOTED_QUOTE || state == LINE_END) { status = BAD_QUOTING; goto out; }
            if (state == FIELD_START) state = UNQUOTED;
            i++;
            continue;
        }
        if (c == 0) { status = NUL_BYTE; goto out; }
        int delimiter = 0, newline = 0;
        if (state == QUOTED) {
            if (c == QUOTE) state = QUOTED_QUOTE;
        } else if (state == LINE_END) {
            if (c != NEWLINE) { status = BAD_QUOTING; goto out; }
            newline = 1;
        } else if (c == COMMA) {
            delimiter = 1;
            field_end = i;
        } else if (c == NEWLINE) {
            newline = 1;
            field_end = i;
        } else if (c == CR) {
            state = LINE_END;
            field_end = i;
        } else if (state == QUOTED_QUOTE) {
            if (c != QUOTE) { status = BAD_QUOTING; goto out; }
            state = QUOTED; /* an escaped quote */
        } else if (state == FIELD_START && c == QUOTE) {
            state = QUOTED;
        } else {
            state = UNQUOTED;
        }
        i++;
        if (!(delimiter || newline)) continue;
        if (newline && field == 0 && field_end == record_start) { /* a blank line */
            state = FIELD_START;
            field_start = record_start = i;
            continue;
        }
        if (field == row_id_column) row_id = parse_row_id(data, field_start, field_end);
        if (field == category_column) {
            category = category_index(data, field_start, field_end, category_spans, n_categories, max_categories);
            if (category < 0) { status = FULL; goto out; } /* the table is full: the next call starts a new one */
            if (category + 1 > n_categories) n_categories = category + 1;
        }
        state = FIELD_START;
        field_start = i;
        if (delimiter) {
            field++;
            continue;
        }
        if (field + 1 != n_columns) { status = WRONG_FIELD_COUNT; goto out; }
        row_ids[n_records] = row_id;
        starts[n_records] = record_start;
        ends[n_records] = i;
        category_ids[n_records] = (int32_t)category;
        n_records++;
        field = 0;
        record_start = i;
        if (record_start >= stop) goto out;
        if (n_records == capacity) { status = FULL; goto out; }
    }
out:
    result[0] = record_start;
    result[1] = n_records;
    result[2] = n_categories;
    return status;
}

/* Index of the first quote in data[i:stop], or stop. */
static inline int64_t next_quote(const uint8_t *data, int64_t i, int64_t stop) {
    const uint8_t *hit = memchr(data + i, QUOTE, (size_t)(stop - i));
    return hit ? hit - data : stop;
}

/* spans[2 * f], spans[2 * f + 1] = begin, end of field f of the record data[start:end] (quotes
 * included, line end excluded); the record must have passed scan_records. Returns the fields found. */
static int64_t field_spans(const uint8_t *data, int64_t start, int64_t end, int64_t *spans, int64_t max_fields) {
    int64_t i = start, field = 0;
    while (field < max_fields) {
        int64_t begin = i;
        if (data[i] == QUOTE) { /* a quoted field: on to its closing quote, past any "" inside */
            i = next_quote(data, i + 1, end);
            while (i + 1 < end && data[i + 1] == QUOTE) i = next_quote(data, i + 2, end);
            i++;
        }
        while (i < end && data[i] != COMMA && data[i] != NEWLINE && data[i] != CR) i++;
        spans[2 * field] = begin;
        spans[2 * field + 1] = i;
        field++;
        if (i >= end || data[i] != COMMA) break;
        i++;
    }
    return field;
}

/* A 64-bit hash of a byte stream fed in pieces; the same bytes give the same hash however they are
 * split. Eight bytes per multiply-xorshift step. Not cryptographic: callers compare the values
 * whose hashes collide. */
typedef struct {
    uint64_t state, pending, length;
} hasher;

#define HASH_MULTIPLIER 0x9E3779B97F4A7C15ULL

static inline uint64_t mix(uint64_t h, uint64_t word) {
    h = (h ^ word) * HASH_MULTIPLIER;
    return h ^ (h >> 29);
}

static void hash_bytes(void *state, const uint8_t *p, int64_t n) {
    hasher *h = state;
    while (n > 0 && (h->length & 7)) { /* complete a pending word first */
        h->pending |= (uint64_t)*p++ << (8 * (h->length & 7));
        h->length++;
        n--;
        if (!(h->length & 7)) {
            h->state = mix(h->state, h->pending);
            h->pending = 0;
        }
    }
    for (; n >= 8; n -= 8, p += 8, h->length += 8) {
        uint64_t word;
        memcpy(&word, p, 8); /* little-endian hosts; a big-endian one hashes differently, consistently */
        h->state = mix(h->state, word);
    }
    for (; n > 0; n--, h->length++) h->pending |= (uint64_t)*p++ << (8 * (h->length & 7));
}

static uint64_t hash_final(hasher *h) {
    uint64_t x = mix(mix(h->state, h->pending), h->length);
    x ^= x >> 32;
    x *= HASH_MULTIPLIER;
    return x ^ (x >> 29);
}

typedef struct {
    uint8_t *values;
    int64_t position;
} copier;

static void copy_bytes(void *state, const uint8_t *p, int64_t n) {
    copier *c = state;
    memcpy(c->values + c->position, p, (size_t)n);
    c->position += n;
}

/* Feed the value of the field data[begin:end] to `put`, unquoted: runs up to each quote whole; ""
 * inside quotes stands for one quote. */
static inline void unquoted(const uint8_t *data, int64_t begin, int64_t end,
                            void (*put)(void *, const uint8_t *, int64_t), void *state) {
    if (end - begin < 2 || data[begin] != QUOTE) { /* unquoted: as it stands */
        put(state, data + begin, end - begin);
        return;
    }
    begin++;
    end--;
    while (begin < end) {
        int64_t quote = next_quote(data, begin, end);
        put(state, data + begin, quote - begin);
        if (quote < end) put(state, (const uint8_t *)"\"", 1);
        begin = quote + 2;
    }
}

/* The fields `fields` (indices) of the records data[starts[r]:ends[r]], unquoted, as Arrow string
 * arrays sharing `values`: column c's bytes are values[bases[c]:bases[c + 1]] and its offsets,
 * relative to bases[c], are offsets[c * (n_records + 1):]. `values` must hold the records' bytes.
 * If hash_field >= 0, hashes[r] is a hash of that field's unquoted value (not copied: for finding
 * duplicates). The records must have passed scan_records. Returns DONE, or NO_MEMORY. */
int64_t extract_fields(const uint8_t *data, const int64_t *starts, const int64_t *ends, int64_t n_records,
                       int64_t n_columns, const int64_t *fields, int64_t n_fields, int32_t *offsets,
                       uint8_t *values, int64_t *bases, int64_t hash_field, uint64_t *hashes) {
    int64_t *spans = malloc(sizeof(int64_t) * 2 * (size_t)(n_columns * (n_records > 0 ? n_records : 1)));
    if (!spans) return NO_MEMORY;
    for (int64_t r = 0; r < n_records; r++) {
        int64_t *record = spans + 2 * n_columns * r;
        field_spans(data, starts[r], ends[r], record, n_columns);
        if (hash_field >= 0) {
            hasher h = {0x243F6A8885A308D3ULL, 0, 0};
            unquoted(data, record[2 * hash_field], record[2 * hash_field + 1], hash_bytes, &h);
            hashes[r] = hash_final(&h);
        }
    }
    copier out = {values, 0};
    for (int64_t c = 0; c < n_fields; c++) {
        int32_t *column_offsets = offsets + c * (n_records + 1);
        bases[c] = out.position;
        column_offsets[0] = 0;
        for (int64_t r = 0; r < n_records; r++) {
            const int64_t *field = spans + 2 * (n_columns * r + fields[c]);
            unquoted(data, field[0], field[1], copy_bytes, &out);
            column_offsets[r + 1] = (int32_t)(out.position - bases[c]);
        }
    }
    bases[n_fields] = out.position;
    free(spans);
    return DONE;
}

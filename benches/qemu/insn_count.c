/* Counts the guest instructions a qemu-user run executes, for comparing kernels by
 * instruction count where only an emulator is available (emulated wall time says nothing
 * about a real core). Build and use:
 *
 *   gcc -shared -fPIC -O2 -o /tmp/insn_count.so benches/qemu/insn_count.c
 *   qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin /tmp/insn_count.so,out=/tmp/n.txt prog args
 *
 * The total goes to the file given by `out=` (or stderr). One inline add per executed
 * translation block of its instruction count: exact for a single-threaded guest. With
 * `sym=on`, the counts per guest symbol (of each block's first instruction; inlined code
 * counts for its caller) follow the total, one `count symbol` per line, largest first; with
 * `tb=on`, the counts per translation block, `count address symbol`, for reading against a
 * disassembly.
 *
 * Written against the qemu plugin API version 1 (qemu 7.x, Debian 12's qemu-user); only the
 * entry points below are used, declared here so that no qemu headers are needed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct {
    const char *target_name;
    struct { int min, cur; } version;
    /* further fields unused */
} qemu_info_prefix;

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                                  void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, int op, void *ptr, uint64_t imm);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn;
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern const char *qemu_plugin_insn_symbol(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void *), void *data);

static uint64_t executed;
static char out_path[512];
static int per_symbol, per_tb;

/* Per-symbol counters, an open-addressed table keyed by qemu's (stable) name pointers. */
#define SYMS 8192
static struct sym { const char *name; uint64_t addr; uint64_t n; } syms[SYMS];

static uint64_t *counter_of(const char *name, uint64_t addr) {
    size_t h = ((uintptr_t)name * 31 + addr) % SYMS;
    for (size_t i = 0; i < SYMS; i++, h = (h + 1) % SYMS) {
        if (syms[h].name == name && syms[h].addr == addr) return &syms[h].n;
        if (!syms[h].name) {
            syms[h].name = name;
            syms[h].addr = addr;
            return &syms[h].n;
        }
    }
    return NULL; /* table full: counted in the total only */
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    /* op 0: QEMU_PLUGIN_INLINE_ADD_U64 */
    qemu_plugin_register_vcpu_tb_exec_inline(tb, 0, &executed, n);
    if ((per_symbol || per_tb) && n) {
        const char *name = qemu_plugin_insn_symbol(qemu_plugin_tb_get_insn(tb, 0));
        uint64_t *c = counter_of(name ? name : "?", per_tb ? qemu_plugin_tb_vaddr(tb) : 0);
        if (c) qemu_plugin_register_vcpu_tb_exec_inline(tb, 0, c, n);
    }
}

static int by_count(const void *a, const void *b) {
    uint64_t x = ((const struct sym *)a)->n, y = ((const struct sym *)b)->n;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void at_exit(qemu_plugin_id_t id, void *data) {
    (void)id;
    (void)data;
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    fprintf(f ? f : stderr, "%llu\n", (unsigned long long)executed);
    if (per_symbol || per_tb) {
        qsort(syms, SYMS, sizeof syms[0], by_count);
        for (size_t i = 0; i < SYMS && syms[i].n; i++) {
            if (per_tb) {
                fprintf(f ? f : stderr, "%llu %llx %s\n", (unsigned long long)syms[i].n,
                        (unsigned long long)syms[i].addr, syms[i].name);
            } else {
                fprintf(f ? f : stderr, "%llu %s\n", (unsigned long long)syms[i].n, syms[i].name);
            }
        }
    }
    if (f) fclose(f);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_prefix *info,
                                                               int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            strncpy(out_path, argv[i] + 4, sizeof out_path - 1);
        } else if (strcmp(argv[i], "sym=on") == 0) {
            per_symbol = 1;
        } else if (strcmp(argv[i], "tb=on") == 0) {
            per_tb = 1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}

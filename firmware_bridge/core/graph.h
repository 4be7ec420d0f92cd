/* graph.h — device graphs: the blob format of PROTOCOL.md "Graph blob", parsed and checked once at LOAD_COMMIT
 * and re-read (cheaply) at every INVOKE, so the firmware keeps no per-graph tables of its own. */
#ifndef FW_GRAPH_H
#define FW_GRAPH_H

#include <stdint.h>
#include <stddef.h>

#ifndef FW_MAX_TENSORS
#define FW_MAX_TENSORS 64u
#endif
#ifndef FW_MAX_NODES
#define FW_MAX_NODES 64u
#endif
#define FW_MAX_RANK 4u
#define FW_MAX_IO 16u
#define FW_MAX_NODE_IN 9u
#define FW_MAX_ATTR 12u

typedef struct {
    uint8_t dtype, rank, is_const;
    uint32_t dims[FW_MAX_RANK];
    uint32_t nbytes;
    uint8_t *data; /* const: inside the blob; activation: inside the graph's region; io: the bound tensor */
} fw_tensor;

typedef struct {
    uint8_t op, n_in, n_out, n_attr;
    uint16_t in[FW_MAX_NODE_IN], out[1];
    int32_t attr[FW_MAX_ATTR];
} fw_node;

typedef struct {
    uint16_t n_tensors, n_nodes, n_inputs, n_outputs;
    fw_tensor t[FW_MAX_TENSORS];
    fw_node node[FW_MAX_NODES];
    uint16_t inputs[FW_MAX_IO], outputs[FW_MAX_IO];
    uint32_t act_bytes;     /* activations (non-const, non-io tensors) + the largest node scratch */
    uint32_t scratch_bytes;
    uint64_t ops;           /* 2 x multiply-accumulates per invoke */
} fw_graph;

/* parses and checks blob into g; 0 or an FW_ERR_* code with a message in *msg */
int fw_graph_parse(fw_graph *g, uint8_t *blob, uint32_t len, const char **msg);
/* points activations into act (g->act_bytes bytes), then runs every node; 0 or FW_ERR_* */
int fw_graph_run(fw_graph *g, uint8_t *act, const char **msg);

#endif

#include "quant/mixed_precision.h"

#include <glpk.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <limits>
#include <cmath>
#include <memory>

#include "core/error.h"

namespace moe::quant {
namespace {

using core::Error;

// Shortest text that reads back as the same double: "1.2", not "1.19999999999999996".
std::string num(double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string glpk_return_name(int ret) {
  switch (ret) {
    case GLP_EBOUND: return "invalid bounds";
    case GLP_EROOT: return "no optimal basis for the root LP";
    case GLP_ENOPFS: return "no primal feasible solution";
    case GLP_ENODFS: return "no dual feasible solution";
    case GLP_EFAIL: return "solver failure";
    case GLP_EMIPGAP: return "relative gap tolerance reached";
    case GLP_ETMLIM: return "time limit reached";
    case GLP_ESTOP: return "stopped";
    default: return "return code " + std::to_string(ret);
  }
}

std::string glpk_status_name(int status) {
  switch (status) {
    case GLP_OPT: return "optimal";
    case GLP_FEAS: return "feasible";
    case GLP_NOFEAS: return "infeasible";
    case GLP_UNDEF: return "undefined";
    default: return "status " + std::to_string(status);
  }
}

// GLPK's terminal output is a per-thread switch: off while we solve, back as it was afterwards.
class TermOutOff {
 public:
  TermOutOff() : previous_(glp_term_out(GLP_OFF)) {}
  ~TermOutOff() { glp_term_out(previous_); }
  TermOutOff(const TermOutOff&) = delete;
  TermOutOff& operator=(const TermOutOff&) = delete;

 private:
  int previous_;
};

struct ProbDeleter {
  void operator()(glp_prob* p) const { glp_delete_prob(p); }
};

// What the branch-and-cut callback needs: the widths, a buffer for a heuristic solution, and the
// last relative gap GLPK reported.
struct Search {
  size_t k;
  const std::vector<WidthOption>& options;
  std::vector<double> x;  // 1-based, as GLPK takes it
  double gap;
};

// At every node GLPK asks for a heuristic solution: the node's LP optimum rounded down, each item
// at the smallest width its LP values use. That spends no more bits than the LP does, so it fits
// the budget; without it GLPK can branch for seconds before it has any assignment on a few
// thousand items. At each node selection, the gap between the incumbent and the best bound.
void search_callback(glp_tree* tree, void* info) {
  auto& s = *static_cast<Search*>(info);
  const int reason = glp_ios_reason(tree);
  if (reason == GLP_ISELECT) {
    s.gap = std::min(s.gap, glp_ios_mip_gap(tree));
  } else if (reason == GLP_IHEUR) {
    glp_prob* P = glp_ios_get_prob(tree);
    const int cols = glp_get_num_cols(P);
    for (int c0 = 1; c0 <= cols; c0 += int(s.k)) {
      int best = -1;
      for (int o = 0; o < int(s.k); ++o) {
        s.x[size_t(c0 + o)] = 0;
        if (glp_get_col_prim(P, c0 + o) > 1e-9 &&
            (best < 0 || s.options[size_t(o)].bits_per_param < s.options[size_t(best)].bits_per_param))
          best = o;
      }
      if (best < 0) return;  // not an LP optimum of this program: offer nothing
      s.x[size_t(c0 + best)] = 1;
    }
    glp_ios_heur_sol(tree, s.x.data());
  }
}

void validate(const std::vector<MixedItem>& items, const std::vector<WidthOption>& options, double avg_bits,
              size_t smallest) {
  for (const auto& it : items) {
    const std::string who = "item '" + it.name + "'";
    if (it.loss.size() != options.size())
      throw Error::invalid(who + " has " + std::to_string(it.loss.size()) + " losses for " +
                           std::to_string(options.size()) + " width options");
    if (!std::isfinite(it.params) || it.params <= 0)
      throw Error::invalid(who + ": params " + num(it.params) + " (must be finite and > 0)");
    if (!std::isfinite(it.importance) || it.importance < 0)
      throw Error::invalid(who + ": importance " + num(it.importance) + " (must be finite and >= 0)");
    for (size_t o = 0; o < options.size(); ++o)
      if (!std::isfinite(it.loss[o]) || it.loss[o] < 0)
        throw Error::invalid(who + ": loss " + num(it.loss[o]) + " at width " + num(options[o].bits_per_param) +
                             " (" + options[o].codec + ") (must be finite and >= 0)");
  }
  if (!std::isfinite(avg_bits))
    throw Error::invalid("--avg-bits " + num(avg_bits) + " is not a finite number");
  if (avg_bits < options[smallest].bits_per_param)
    throw Error::invalid("--avg-bits " + num(avg_bits) + " is below the smallest width " +
                         num(options[smallest].bits_per_param) + " (" + options[smallest].codec + ")");
}

}  // namespace

MixedResult choose_widths(const std::vector<MixedItem>& items, const std::vector<WidthOption>& options, double avg_bits,
                          const MixedSolve& solve) {
  if (items.empty()) throw Error::invalid("mixed precision: no items to give widths");
  if (options.empty()) throw Error::invalid("mixed precision: no width options");
  size_t smallest = 0;
  for (size_t o = 0; o < options.size(); ++o) {
    const double b = options[o].bits_per_param;
    if (!std::isfinite(b) || b <= 0)
      throw Error::invalid("width option '" + options[o].codec + "': bits per param " + num(b) +
                           " (must be finite and > 0)");
    if (b < options[smallest].bits_per_param) smallest = o;
  }
  validate(items, options, avg_bits, smallest);
  if (!(solve.mip_gap >= 0) || !std::isfinite(solve.mip_gap))
    throw Error::invalid("mixed precision: mip_gap " + num(solve.mip_gap) + " (must be finite and >= 0)");
  if (!(solve.time_limit_s >= 0))
    throw Error::invalid("mixed precision: time limit " + num(solve.time_limit_s) + " s (must be >= 0)");

  const size_t n = items.size(), k = options.size();
  if (n * k > size_t(INT_MAX / 2) || n > size_t(INT_MAX / 2))
    throw Error::invalid("mixed precision: " + std::to_string(n) + " items x " + std::to_string(k) +
                         " widths is more than the solver takes");
  double total_params = 0;
  for (const auto& it : items) total_params += it.params;

  // The program in well-scaled units. Every item takes exactly one width, so the smallest
  // width's Σ params·bits is spent whatever the choice: the budget row counts only the bits above
  // the smallest width, as a share of all parameters,
  //   Σ_j Σ_o (params_j / Σ params) · (bits_o − bits_min) · x_jo ≤ avg_bits − bits_min,
  // (budget exactly at the smallest width: right-hand side 0), and the objective is divided by
  // its largest coefficient, so GLPK's absolute tolerances see values of order 1.
  const double bits_min = options[smallest].bits_per_param;
  double cmax = 0;
  for (const auto& it : items)
    for (double l : it.loss) cmax = std::max(cmax, it.importance * l);
  const double cscale = cmax > 0 && std::isfinite(cmax) ? 1.0 / cmax : 1.0;

  const TermOutOff quiet;
  std::unique_ptr<glp_prob, ProbDeleter> lp(glp_create_prob());
  glp_prob* P = lp.get();
  glp_set_obj_dir(P, GLP_MIN);
  const int rows = int(n) + 1, cols = int(n * k);
  glp_add_rows(P, rows);
  for (int j = 1; j <= int(n); ++j) glp_set_row_bnds(P, j, GLP_FX, 1.0, 1.0);
  glp_set_row_bnds(P, rows, GLP_UP, 0.0, avg_bits - bits_min);
  glp_add_cols(P, cols);

  // Constraint matrix as (row, col, value) triplets, 1-based (GLPK ignores index 0).
  std::vector<int> ia(1), ja(1);
  std::vector<double> ar(1);
  ia.reserve(2 * n * k + 1), ja.reserve(2 * n * k + 1), ar.reserve(2 * n * k + 1);
  for (size_t j = 0; j < n; ++j) {
    const double share = items[j].params / total_params;
    for (size_t o = 0; o < k; ++o) {
      const int c = int(j * k + o) + 1;
      glp_set_col_kind(P, c, GLP_BV);
      glp_set_obj_coef(P, c, items[j].importance * items[j].loss[o] * cscale);
      ia.push_back(int(j) + 1), ja.push_back(c), ar.push_back(1.0);
      const double extra = share * (options[o].bits_per_param - bits_min);
      if (extra != 0) ia.push_back(rows), ja.push_back(c), ar.push_back(extra);
    }
  }
  glp_load_matrix(P, int(ar.size()) - 1, ia.data(), ja.data(), ar.data());

  // The LP relaxation first (glp_intopt's own presolver would renumber the columns the rounding
  // heuristic below reads), then branch and cut from its basis.
  glp_smcp sparm;
  glp_init_smcp(&sparm);
  sparm.msg_lev = GLP_MSG_OFF;
  const int sret = glp_simplex(P, &sparm);
  if (sret != 0) throw Error::internal("mixed precision: GLPK glp_simplex failed: " + glpk_return_name(sret));
  if (glp_get_status(P) != GLP_OPT)
    throw Error::internal("mixed precision: the LP relaxation ended " + glpk_status_name(glp_get_status(P)));

  Search search{k, options, std::vector<double>(n * k + 1), std::numeric_limits<double>::infinity()};
  glp_iocp parm;
  glp_init_iocp(&parm);
  parm.msg_lev = GLP_MSG_OFF;
  parm.mip_gap = solve.mip_gap;
  if (solve.time_limit_s > 0) parm.tm_lim = int(std::min(solve.time_limit_s * 1000.0, double(INT_MAX)));
  parm.cb_func = search_callback;
  parm.cb_info = &search;
  const int ret = glp_intopt(P, &parm);
  const int status = glp_mip_status(P);
  std::string result_status;
  if (ret == 0 && status == GLP_OPT) result_status = "optimal";
  else if (ret == GLP_EMIPGAP && status == GLP_FEAS) result_status = "within gap";
  else if (ret == GLP_ETMLIM && status == GLP_FEAS) result_status = "time limit";
  else if (ret == GLP_ETMLIM)
    throw Error::internal("mixed precision: GLPK found no assignment within the time limit of " + num(solve.time_limit_s) + " s");
  else if (ret != 0)
    throw Error::internal("mixed precision: GLPK glp_intopt failed: " + glpk_return_name(ret));
  else
    throw Error::internal("mixed precision: GLPK ended with a " + glpk_status_name(status) + " solution, not an optimal one");

  MixedResult r;
  r.choice.assign(n, -1);
  double bits_sum = 0;
  for (size_t j = 0; j < n; ++j) {
    for (size_t o = 0; o < k; ++o) {
      if (glp_mip_col_val(P, int(j * k + o) + 1) > 0.5) {
        if (r.choice[j] >= 0)
          throw Error::internal("mixed precision: GLPK gave item '" + items[j].name + "' two widths");
        r.choice[j] = int(o);
      }
    }
    if (r.choice[j] < 0) throw Error::internal("mixed precision: GLPK gave item '" + items[j].name + "' no width");
    r.objective += items[j].importance * items[j].loss[size_t(r.choice[j])];
    bits_sum += items[j].params * options[size_t(r.choice[j])].bits_per_param;
  }
  r.avg_bits = bits_sum / total_params;
  // GLPK accepts a row within its feasibility tolerance (1e-7, relative); more than that is a bug.
  if (r.avg_bits > avg_bits + 1e-6 * std::max(1.0, avg_bits))
    throw Error::internal("mixed precision: GLPK's choice averages " + num(r.avg_bits) + " bits, over the budget " +
                          num(avg_bits));
  r.status = result_status;
  r.gap = result_status == "optimal" ? 0.0 : std::min(search.gap, ret == GLP_EMIPGAP ? solve.mip_gap : search.gap);
  return r;
}

double mc_moe_importance(double frequency, double routing_weight, double alpha, double beta) {
  if (!std::isfinite(frequency) || frequency < 0)
    throw Error::invalid("MC-MoE importance: frequency " + num(frequency) + " (must be finite and >= 0)");
  if (!std::isfinite(routing_weight) || routing_weight < 0)
    throw Error::invalid("MC-MoE importance: routing weight " + num(routing_weight) + " (must be finite and >= 0)");
  if (!std::isfinite(alpha) || !std::isfinite(beta))
    throw Error::invalid("MC-MoE importance: exponents alpha " + num(alpha) + ", beta " + num(beta) + " must be finite");
  return std::pow(frequency, alpha) * std::pow(routing_weight, beta);
}

}  // namespace moe::quant

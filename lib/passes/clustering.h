// Clustering of experts by their statistics: k-means (Sub-MoE, on rows of out_cos) and
// agglomerative clustering with average linkage (HC-SMoE, on out_mean rows). Both return groups
// of point indices in canonical order: members ascending, groups ordered by their smallest member.
#pragma once

#include <cstdint>
#include <vector>

#include "passes/hungarian.h"  // MatrixXdRM

namespace moe::passes {

using Groups = std::vector<std::vector<int>>;

// Groups from labels (label per point, any values): canonical order as above.
Groups groups_from_labels(const std::vector<int>& labels);

// Lloyd's k-means on the rows of `points` [n,d] into exactly k non-empty clusters (1 <= k <= n).
// k-means++ initialisation from std::mt19937_64(seed) (when every remaining point coincides with
// a centre, the lowest-index unused point is taken); then at most `max_iter` assignment/update
// rounds, stopping when no label changes. Ties go to the lower centre index; a cluster that
// empties takes the point farthest from its centre among clusters of size > 1.
// Same inputs and seed → same groups.
Groups kmeans(const MatrixXdRM& points, int k, uint64_t seed, int max_iter = 100);

// Agglomerative clustering with average linkage on Euclidean distances between the rows of
// `points` [n,d], merging the closest pair of clusters until k remain (1 <= k <= n).
// Linkage: d(A,B) = mean over a∈A, b∈B of ‖a − b‖₂. Ties: the pair with the lowest indices.
Groups agglomerative_average(const MatrixXdRM& points, int k);

}  // namespace moe::passes

# The default policy: deny everything. Operators replace it through the admin API
# (`POST /v1/admin/policies/active`) or a bundle; see examples/.
package intentgate.policy

default decision := {
	"allow": false,
	"reason": "denied by default",
}

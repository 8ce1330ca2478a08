package inventory

import "slices"

// Equal reports whether d and o are the same verdict on the same function
// in the same state.
func (d Decision) Equal(o Decision) bool {
	return d.Offered == o.Offered && d.Reason == o.Reason && d.Device.Equal(o.Device) &&
		slices.Equal(d.GroupMembers, o.GroupMembers) && slices.Equal(d.Notes, o.Notes)
}

// EqualDecisions reports whether a and b hold equal decisions in the same
// order.
func EqualDecisions(a, b []Decision) bool {
	return slices.EqualFunc(a, b, Decision.Equal)
}

package agent

// SetHealthDial makes a's local health probes open their connections
// with dial: a test's probes then leave from a network namespace the test
// made, where its pods' addresses are, instead of this machine's. Call it
// after New, before Run.
func SetHealthDial(a *Agent, dial dialFunc) {
	if a.health != nil {
		a.health.probe = newProber(dial)
	}
}

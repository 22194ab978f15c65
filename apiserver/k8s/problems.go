package k8s

import (
	"strings"
)

// Problem reporting: each distinct problem of an object is logged and
// counted once, until it is cleared or its detail changes.

// report logs and counts problem p of obj, once per distinct detail.
func (s *Source) report(obj string, p Problem, detail string) {
	s.pmu.Lock()
	m := s.reported[obj]
	if m == nil {
		m = map[Problem]string{}
		s.reported[obj] = m
	}
	if prev, ok := m[p]; ok && prev == detail {
		s.pmu.Unlock()
		return
	}
	m[p] = detail
	s.stats.Problems[p]++
	s.pmu.Unlock()
	s.cfg.Metrics.problem(p)
	s.log.Warn(problemMessage(p), "object", obj, "problem", string(p), "detail", detail)
}

// reportList reports a list of skipped parts, or clears p when it is empty.
func (s *Source) reportList(obj string, p Problem, parts []string) {
	if len(parts) == 0 {
		s.clear(obj, p)
		return
	}
	s.report(obj, p, "left out: "+strings.Join(parts, "; "))
}

// clear forgets problems of obj, so they are logged again if they recur.
func (s *Source) clear(obj string, ps ...Problem) {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	m := s.reported[obj]
	if m == nil {
		return
	}
	for _, p := range ps {
		delete(m, p)
	}
	if len(m) == 0 {
		delete(s.reported, obj)
	}
}

// forget drops every problem of a deleted object.
func (s *Source) forget(obj string) {
	s.pmu.Lock()
	delete(s.reported, obj)
	s.pmu.Unlock()
}

// problemMessage is the log message for problem p.
func problemMessage(p Problem) string {
	switch p {
	case ProblemMalformedAnnotation:
		return "malformed mesh annotation on service"
	case ProblemNodeWithoutInternalIP:
		return "node has no InternalIP; not published"
	case ProblemUnparsable:
		return "parts of object could not be mapped"
	case ProblemPodWithoutHostIP:
		return "running pod has no host IP; endpoints not published"
	case ProblemTooManyLabels:
		return "pod has too many identity labels; not published"
	case ProblemIdentityRefused:
		return "identity allocation refused; pod not published"
	case ProblemSinkRefused:
		return "mesh API server refused object"
	}
	return "problem"
}

package registry

import (
	"errors"
	"fmt"
)

// ErrInvalid marks a request the registry refused; nothing was stored.
var ErrInvalid = errors.New("invalid")

// ErrNotFound marks a delete of an object that is not registered.
var ErrNotFound = errors.New("not found")

func invalid(err error) error {
	if errors.Is(err, ErrInvalid) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrInvalid, err)
}

func notFound(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrNotFound, fmt.Sprintf(format, args...))
}

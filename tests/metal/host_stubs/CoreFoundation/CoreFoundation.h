// The CoreFoundation scalar and geometry types metal-cpp uses.
#pragma once
#include <stdint.h>
typedef double CFTimeInterval;
typedef const struct __CFString* CFStringRef;
typedef double CGFloat;
typedef struct CGSize { double width, height; } CGSize;
typedef struct CGPoint { double x, y; } CGPoint;
typedef struct CGRect { CGPoint origin; CGSize size; } CGRect;
